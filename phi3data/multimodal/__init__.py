"""Image-text data for phi-3-vision and LLaVA-Phi: records (records.py), readers (readers.py), writers
(writers.py) and a URL-list fetcher (fetch.py)."""
