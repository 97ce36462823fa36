"""Datasets: the real ViSU layout (:mod:`training.data.visu`) and its synthetic stand-in (:mod:`training.data.synthetic`).

Kept free of imports so ``safe-retrieval data synth`` does not pay for torch.
"""
