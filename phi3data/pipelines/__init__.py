"""Pipelines: stages that map a document batch to a batch, and the Pipeline that chains them."""
