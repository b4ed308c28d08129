"""Sparse autoencoders in numpy: one architecture per module, chosen by name."""

from pertoken.errors import PertokenError
from pertoken.sae.base import SAE, SAEInfo
from pertoken.sae.jumprelu import JumpReLUSAE
from pertoken.sae.relu import ReLUSAE
from pertoken.sae.topk import TopKSAE

SAE_CLASSES: dict[str, type[SAE]] = {
    "jumprelu": JumpReLUSAE,
    "topk": TopKSAE,
    "standard": ReLUSAE,
    "relu": ReLUSAE,
}


def sae_class(architecture: str) -> type[SAE]:
    """The SAE class registered under `architecture` (jumprelu, topk, standard/relu)."""
    try:
        return SAE_CLASSES[architecture.lower()]
    except KeyError:
        raise PertokenError(
            f"SAE architecture {architecture!r} is not supported: pertoken reads "
            f"{', '.join(sorted(SAE_CLASSES))}"
        ) from None


__all__ = ["SAE", "SAEInfo", "JumpReLUSAE", "ReLUSAE", "TopKSAE", "SAE_CLASSES", "sae_class"]
