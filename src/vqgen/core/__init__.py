"""vqgen's core: interfaces, registry, plugin contract, configs, data, CLI.

Imports nothing from ``vqgen.plugins``, ``vqgen.conditioners``,
``vqgen.orderings`` or ``vqgen.samplers``.
"""
