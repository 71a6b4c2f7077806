"""The diffusers code ldm_fast's patches reproduce, by source digest (:func:`ldm_fast.integrations.source.digest`:
formatting, comments, docstrings and annotations aside, the same on every Python).

:data:`SUPPORTED` maps each function a patch replaces or relies on to the digests of the sources it
was written for, each with the diffusers releases that ship it and the variant of ldm_fast's
implementation that reproduces it. A module whose code is not listed is left to diffusers (the
report says so, and :func:`ldm_fast.optimize` warns once, naming the installed diffusers).
``python -m benchmarks.diffusers_versions`` re-derives the release ranges from the published wheels;
``tests/test_diffusers_sources.py`` checks that the installed diffusers' sources are listed here.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

from ..source import digest
from ...optimize.patch import UnknownSource

#: The diffusers releases every patch supports.
RELEASES = "0.30.0-0.42.1"


class Source(NamedTuple):
    releases: str  # the diffusers releases that ship this source
    variant: Optional[str] = None  # which of ldm_fast's implementations reproduces it (None: the only one)


SUPPORTED: Dict[str, Dict[str, Source]] = {
    "ResnetBlock2D.forward": {
        # the three differ only in the conv_shortcut's input: as it is, .contiguous(), .contiguous() in training
        "d141ce52727e0b9c9463dc4b26fd6e64d1afb97e3b1efaf2ade59a70b15c9033": Source("0.30.0-0.32.2", "never"),
        "a6f1cef997c5d9e680aecb8dcf458bc7eb0d0d42dc1bafa31895311c3f958162": Source("0.33.0-0.36.0", "always"),
        "efcb60862e4c8f697d121fbe267d8e8af5a4e46fbb2b044065aac2017c001c7e": Source("0.37.0-0.42.1", "training"),
    },
    "BasicTransformerBlock.forward": {
        "31e6464b3204d1b4adc26bc2bbfec1dd97b70f3f60d36ad5210846a5bd6e897d": Source("0.30.0-0.42.1"),
    },
    "FeedForward.forward": {
        "3a94ce5af00c066ee235378350599913d0d86a0674f348b5e9ae90fdbe9f2c59": Source("0.30.0-0.42.1"),
    },
    "GEGLU.forward": {
        "4df1abeeabbdc2d5b607176a7878777987d78ec8e3fb6feb07f9d050bcbcf7a3": Source("0.30.0-0.42.1"),
    },
    "GEGLU.gelu": {
        # the two differ only on Apple's mps device (where the kernel never runs: diffusers' own forward runs)
        "51c96b59880d9f868da0021da7b2cd48ff27fc75e377057a0fc58f1c74ca395b": Source("0.30.0-0.31.0"),
        "2c2919c99c267d4dfef60207a2856ee7709dc3ba979d8f48c3cd575ae99cf338": Source("0.32.0-0.42.1"),
    },
    "Timesteps.forward": {
        "5a464837b67661b141ef5131c681a0a40ae1b901b7f5c3ea7660ff0aa6c8ff75": Source("0.30.0-0.42.1"),
    },
    "get_timestep_embedding": {
        "83e1216007c69729fc7e879ceb5643e7a7da0bbae902be5bb61b4dbc8074a43a": Source("0.30.0-0.42.1"),
    },
    "Transformer2DModel._get_output_for_continuous_inputs": {
        "86ec7c6da57e36245dbbbe0d93a31b3da9d94fe0408f2ab4fdab833c3b4a738e": Source("0.30.0-0.42.1"),
    },
    "AttnProcessor2_0.__call__": {
        "013cd1d0a17753adfe3e4f8c7175db23748de37fcb2d1531bcbd701e56e73c7e": Source("0.30.0-0.42.1"),
    },
    "AttnProcessor.__call__": {
        "12cd9ae937022b8f43e549545976cf779a1eb2fcb36afd2b61d8e63cfbcc7cb8": Source("0.30.0-0.42.1"),
    },
    "Attention.forward": {
        # the two differ only in the kwargs they pass over quietly; without cross_attention_kwargs both
        # are the processor's call (the add_layer_norm patch makes that call itself then)
        "e1ee558203616fd3e3c2f15522bba23bea3cdae3d3aac892fccda188b0bf0d7e": Source("0.30.0-0.31.0"),
        "77d373973e141707c3b1b6a8b783533bb29ab191892894128dce3b5867896160": Source("0.32.0-0.42.1"),
    },
}


#: Where each function of :data:`SUPPORTED` lives in diffusers 0.30-0.42 (file under ``diffusers/``,
#: class or None for a module-level function, name), and the functions each patch needs known.
LOCATIONS: Dict[str, Tuple[str, Optional[str], str]] = {
    "ResnetBlock2D.forward": ("models/resnet.py", "ResnetBlock2D", "forward"),
    "BasicTransformerBlock.forward": ("models/attention.py", "BasicTransformerBlock", "forward"),
    "FeedForward.forward": ("models/attention.py", "FeedForward", "forward"),
    "GEGLU.forward": ("models/activations.py", "GEGLU", "forward"),
    "GEGLU.gelu": ("models/activations.py", "GEGLU", "gelu"),
    "Timesteps.forward": ("models/embeddings.py", "Timesteps", "forward"),
    "get_timestep_embedding": ("models/embeddings.py", None, "get_timestep_embedding"),
    "Transformer2DModel._get_output_for_continuous_inputs": (
        "models/transformers/transformer_2d.py", "Transformer2DModel", "_get_output_for_continuous_inputs"),
    "AttnProcessor2_0.__call__": ("models/attention_processor.py", "AttnProcessor2_0", "__call__"),
    "AttnProcessor.__call__": ("models/attention_processor.py", "AttnProcessor", "__call__"),
    "Attention.forward": ("models/attention_processor.py", "Attention", "forward"),
}
PATCH_SOURCES: Dict[str, Tuple[str, ...]] = {
    "resnet": ("ResnetBlock2D.forward",),
    "add_layer_norm": ("BasicTransformerBlock.forward", "FeedForward.forward"),
    "geglu": ("GEGLU.forward", "GEGLU.gelu"),
    "timestep_embedding": ("Timesteps.forward", "get_timestep_embedding"),
    "channels_last": ("Transformer2DModel._get_output_for_continuous_inputs",),
    "attention": ("AttnProcessor2_0.__call__", "AttnProcessor.__call__"),
}


def is_diffusers(obj, name: str) -> bool:
    """Whether ``obj``'s class is diffusers' class ``name`` (by name and module: diffusers is never imported)."""
    cls = type(obj)
    return cls.__name__ == name and (cls.__module__ or "").startswith("diffusers.")


def installed_version() -> str:
    """The version of the diffusers that is imported (or 'unknown')."""
    module = sys.modules.get("diffusers")
    return str(getattr(module, "__version__", "unknown"))


def known(cls: type, functions: Sequence[Tuple[str, Optional[Callable]]]) -> Union[Tuple[Optional[str], ...], UnknownSource]:
    """The variants (one per function) of the sources ``functions`` (``(name in SUPPORTED, the
    function)``, read from ``cls`` or its module), or the :class:`UnknownSource` reason naming the
    first one ldm_fast does not know."""
    variants = []
    for name, fn in functions:
        value = digest(fn)
        if value is None:
            return UnknownSource(f"the source of {cls.__module__}.{name} cannot be read to check it")
        source = SUPPORTED[name].get(value)
        if source is None:
            return UnknownSource(f"{cls.__module__}.{name} is not the code ldm_fast reproduces (it knows diffusers "
                                 f"{RELEASES}; installed: {installed_version()}; source digest {value[:12]})")
        variants.append(source.variant)
    return tuple(variants)


def module_function(cls: type, name: str) -> Optional[Callable]:
    """The module-level function ``name`` of ``cls``'s module (e.g. ``get_timestep_embedding``)."""
    return getattr(sys.modules.get(cls.__module__), name, None)
