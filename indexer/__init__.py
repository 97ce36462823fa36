"""Middle floor of safe-retrieval: vector stores, index generations, the indexing pipeline, search."""
