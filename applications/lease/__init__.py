"""LeaSE (Learning by Self-Explanation) neural architecture search.

- :mod:`.spaces`: DARTS / PC-DARTS / P-DARTS supernets and genotypes.
- :mod:`.models`: audience ResNets and evaluation networks.
- :mod:`.data`: digits, CIFAR-10/100 and ImageNet with per-example indices.
- :mod:`.train`: ``python -m applications.lease.train`` trains a genotype from scratch.
"""
