"""The GPU acceptance check behind ``benchmarks/gpu_check.py`` (see docs/gpu_check.md).

Every CUDA path of vramsweep measured once on one GPU, in parts that each run in their
own process with a time limit: ``parts`` holds the parts, ``part`` is the entry point
of a part's process, ``runner`` starts it from the check, ``report`` is the JSON schema
and the Markdown summary. ``--cpu`` runs the same code on the tiny backbones on a CPU.
"""
