"""Paraphrase-robustness evaluation.

    metrics.py                 AO@k, JS@k (paper, Appendix B) and recall@k, per list and per score matrix
    paraphrased_retrieval.py   the paraphrased-retrieval task on a pairs file + image folder
    cli.py                     the ``paraclip-eval`` command, one subcommand per task
"""
