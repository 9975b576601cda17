"""dsv4: DeepSeek V4 from its PyTorch definition to verified inference artifacts.

The top-level folders of the repository (models/, export/, passes/, runtimes/, tools/) install as
subpackages of this namespace: ``from dsv4.models import DeepseekV4``.
"""

__version__ = "0.1.0"
