"""torch.hub entry points: one per model of histohub's weights manifest.

    model = torch.hub.load("<org>/histohub", "resnet18_ssl")          # eval mode, (B, 512)
    transform = torch.hub.load("<org>/histohub", "get_transform", "resnet18-ssl")
    print(torch.hub.help("<org>/histohub", "resnet18_ssl"))

torch.hub puts this directory first on ``sys.path``, so ``histohub`` below is this
checkout's package. The entry points are generated from the manifest that
``histohub.load_pretrained`` reads (``HISTOHUB_MANIFEST`` files included), so the two
front doors cannot drift apart. Names are the manifest's with ``-`` and ``.`` turned
into ``_`` (``resnet18-ssl`` -> ``resnet18_ssl``).
"""

dependencies = ["torch", "torchvision", "safetensors", "requests", "filelock", "tqdm",
                "numpy", "PIL"]

# Underscored names: torch.hub.list() shows every public callable as an entry point.
import textwrap as _textwrap  # noqa: E402

from histohub import get_entry as _get_entry  # noqa: E402
from histohub import get_transform  # noqa: E402,F401  (an entry point too)
from histohub import list_models as _list_models  # noqa: E402
from histohub import load_pretrained as _load_pretrained  # noqa: E402
from histohub.errors import ManifestError as _ManifestError  # noqa: E402


def _wrap(text: str, hanging: str = "    ") -> str:
    return _textwrap.fill(text, 88, subsequent_indent=hanging)


def _family(entry) -> str:
    if entry.is_zoo:
        return f"timm Vision Transformer, {entry.pooling} features"
    return "torchvision ResNet, classifier removed"


def _docstring(entry) -> str:
    """What ``torch.hub.help`` shows: the entry's description, shapes, preprocessing,
    integrity, licence and citation."""
    pre = entry.preprocessing
    unpinned = [w.filename for w in entry.weights if not w.sha256]
    integrity = ("sha256 pinned in the manifest, verified on every load" if not unpinned else
                 f"sha256 not pinned yet for {', '.join(unpinned)}: the first verified "
                 "download's hash is recorded in the cache and checked on every later load")
    mpp = f"{pre.mpp:g} um/px" if pre.mpp else "a resolution the manifest does not record"
    return "\n".join([
        _wrap(entry.description, hanging=""),
        "",
        f"Architecture: {entry.arch} ({_family(entry)}),",
        f"    (B, 3, {pre.input_size}, {pre.input_size}) -> (B, {entry.feature_dim}) features.",
        _wrap(f"Preprocessing: RGB resized to {pre.input_size} px ({pre.interpolation}), "
              f"scaled to [0, 1], normalised with mean {pre.mean} and std {pre.std}; "
              f"tiles at {mpp}. {pre.mpp_note}"),
        f'    transform = torch.hub.load(REPO, "get_transform", "{entry.name}"), or',
        f'    histohub.get_transform("{entry.name}").',
        _wrap(f"Weights: {', '.join(w.filename for w in entry.weights)} ({integrity})."),
        f"Licence: {entry.license}.",
        *([_wrap("Restricted (non-commercial or gated): pass accept_licence=True once to "
                 "accept it.")] if entry.licence.restricted else []),
        _wrap(f"Citation: {entry.citation}"),
        "",
        "Args:",
        "    pretrained: load the verified weights (default), or return the architecture",
        "        randomly initialised.",
        '    **kwargs: passed to histohub.load_pretrained (device="cpu", progress=True).',
        "",
        "Returns:",
        "    The encoder in eval mode; ``model.histohub_info`` names its weights (sha256)",
        "    and preprocessing.",
    ])


def _entry_point(entry):
    def entry_point(pretrained: bool = True, **kwargs):
        return _load_pretrained(entry.name, pretrained=pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = entry.hub_name
    entry_point.__doc__ = _docstring(entry)
    return entry_point


for _entry in map(_get_entry, _list_models()):
    if _entry.hub_name in globals():
        raise _ManifestError(
            f"Model {_entry.name!r} ({_entry.manifest_path}) would be the torch.hub entry "
            f"point {_entry.hub_name!r}, which is already taken; rename the model")
    globals()[_entry.hub_name] = _entry_point(_entry)
