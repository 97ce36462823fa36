"""Evaluation of trained encoders: retrieval, unlearning, and the statistics behind their figures.

``common`` embeds a split once and ranks in an artifact's space (what both evaluations share);
``retrieval`` is the ViSU protocol (HySAC Tables 1-2, safety, traversal sweep); ``unlearning`` measures
forgetting (zero-shot, recall, multi-concept, residue probes and floors, look-alikes); ``report`` labels
rows, loads the artifacts one at a time and writes report files atomically; ``stats`` gives the
bootstrap intervals and ``probes`` the probes and their floors.
"""
