"""fastnca: fast, faithful Variational Neural Cellular Automata (Palm et al., ICLR 2022).

Quick use::

    import fastnca
    model = fastnca.build_model("mnist-doubling", backend="torch")
    loss = model(x)["loss"]            # x: (B, 1, 32, 32) in {0, 1}
    log_px = model.iwae(x, k=128)      # (B,) nats
"""

from fastnca.config import PRESETS, Config, get_preset, preset_names
from fastnca.nca import NCA, UpdateNet
from fastnca.vae import VNCA, ConvVAE, Encoder, build_model

__version__ = "0.1.0"

__all__ = ["Config", "PRESETS", "get_preset", "preset_names", "NCA", "UpdateNet", "VNCA", "ConvVAE", "Encoder",
           "build_model", "__version__"]
