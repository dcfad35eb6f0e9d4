"""The ``make demo`` pipeline: a synthetic world, baseline CLIP, ParaCLIP fine-tuning, before/after report.

world.py    the seeded synthetic image-caption world: four-field training shards + held-out eval pairs
report.py   the before/after table, results.json and the chart
"""
