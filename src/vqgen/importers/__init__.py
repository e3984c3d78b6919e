"""Importers: checkpoints of other toolkits turned into vqgen run directories."""
