"""Training strategies, one module each, registered here by name.

Each strategy module provides ``build_model(cfg, num_classes, in_chans, load_init_from=True)`` returning an
``nn.Module`` whose ``forward(batch)`` returns a dict with at least ``"loss"``.
"""

from types import ModuleType

from pretrainlab.strategies import supervised

STRATEGIES: dict[str, ModuleType] = {
    "supervised": supervised,
}


def get_strategy(name: str) -> ModuleType:
    """The strategy module registered under ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"strategy: unknown {name!r}; valid: {', '.join(STRATEGIES)}") from None
