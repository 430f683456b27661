"""ramoe_ray: routing-aligned fine-tuning of MoE LLMs (RA-MoE) as a Ray-distributed sweep system."""

__version__ = "0.1.0"
