"""phi-3 model: the decoder, attention kernels, Hugging Face import/export."""

from phi3data.model.model import Phi3, Phi3Config, num_parameters

__all__ = ["Phi3", "Phi3Config", "num_parameters"]
