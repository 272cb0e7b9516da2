"""gptfl-ray: GPT-FL (generative pre-trained model-assisted federated learning) on Ray."""

__version__ = "0.1.0"
