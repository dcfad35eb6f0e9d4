"""Paraphrase-robustness evaluation.

metrics.py                 AO@k, JS@k (paper, Appendix B) and recall@k, per list and per score matrix
common.py                  shared by the tasks: InputError, reading JSON/text files, loading the model,
                           batched image/text embedding, the precision record, PROG
paraphrased_retrieval.py   the paraphrased-retrieval task on a pairs file + image folder
aro.py                     VG-Relation / VG-Attribution (ARO's files, crops and accuracy)
sts.py                     the seven STS tasks: Spearman of text-embedding cosines
benchmark.py               zero-shot ImageNet-1k and COCO retrieval through clip_benchmark
table1.py                  every task on one model -> table1.json + table1.md; --compare
cli.py                     the ``paraclip-eval`` command, one subcommand per task

Task modules import shared things from common.py only; table1.py composes the tasks' public functions.
"""
