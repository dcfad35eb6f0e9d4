"""Paraphrase-robustness evaluation.

metrics.py                 AO@k, JS@k (paper, Appendix B) and recall@k, per list and per score matrix
paraphrased_retrieval.py   the paraphrased-retrieval task on a pairs file + image folder; model loading
                           and batched embedding shared by the other tasks
aro.py                     VG-Relation / VG-Attribution (ARO's files, crops and accuracy)
sts.py                     the seven STS tasks: Spearman of text-embedding cosines
benchmark.py               zero-shot ImageNet-1k and COCO retrieval through clip_benchmark
table1.py                  every task on one model -> table1.json + table1.md; --compare
cli.py                     the ``paraclip-eval`` command, one subcommand per task
"""
