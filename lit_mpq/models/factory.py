"""Build a backbone by name from our registry, torchvision or timm, and load local checkpoints.

Name resolution in :func:`create_backbone`:

1. a name registered with :func:`~lit_mpq.models.registry.register_backbone` (``cifar_resnet20``, ``digits_cnn``...);
2. ``torchvision:<name>`` (e.g. ``torchvision:resnet18``) goes to ``torchvision.models.get_model``;
3. anything else goes to ``timm.create_model`` (``timm:<name>`` forces timm when a name is ambiguous).

This project's machines are offline. Pretrained downloads therefore start with a quick reachability check of the
weight host; when it cannot be reached, weights already in the local cache (Hugging Face or torch hub) load from
there without touching the network, and otherwise one :class:`PretrainedWeightsUnavailableError` says how to point
``checkpoint_path`` at local weights instead, before any model is built.

Checkpoint files are only ever read with ``torch.load(weights_only=True)``: unpickling arbitrary objects can run
code, so a file that needs it is refused with a message on how to convert it. After loading, every float parameter
and buffer must be finite (:class:`ValueError` naming the tensor otherwise), and a convolution or linear layer whose
weight is all zeros gets a warning.

Example:
    >>> model = create_backbone("cifar_resnet20")
    >>> backbone_input_size(model)
    (3, 32, 32)
"""

from __future__ import annotations

import difflib
import os
import pickle
import socket
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from lit_mpq.models.registry import get_backbone_fn, is_backbone, list_backbones

__all__ = [
    "HF_HUB_HOST",
    "TORCHVISION_HOST",
    "TORCHVISION_PREFIX",
    "PretrainedWeightsUnavailableError",
    "backbone_input_size",
    "check_weights",
    "create_backbone",
    "is_host_reachable",
    "load_checkpoint",
    "load_weights_file",
]

TORCHVISION_PREFIX = "torchvision:"
"""Prefix that routes a name to ``torchvision.models.get_model``."""
TIMM_PREFIX = "timm:"
"""Optional prefix that routes a name to ``timm.create_model``."""
HF_HUB_HOST = "huggingface.co"
"""Host of timm's pretrained weights (Hugging Face Hub)."""
TORCHVISION_HOST = "download.pytorch.org"
"""Host of torchvision's pretrained weights."""
REACHABILITY_TIMEOUT_S = 3.0
"""Seconds the reachability check waits for a TCP connection (DNS lookup included)."""
DEFAULT_INPUT_SIZE: tuple[int, int, int] = (3, 224, 224)
"""Input size assumed for a model that declares none (the torchvision ImageNet default)."""

_LOCAL_DIR_PREFIX = "local-dir:"
_TIMM_PASSTHROUGH_PREFIXES = ("hf-hub:", "hf_hub:", _LOCAL_DIR_PREFIX)
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""What timm looks for in a Hub repository, safetensors first (``timm.models._hub.load_state_dict_from_hf``)."""
_STRIP_PREFIXES = ("model.", "module.", "_orig_mod.")
_MAX_LISTED_KEYS = 5


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (typically: no network) and are not in the local cache."""


def is_host_reachable(host: str, port: int = 443, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Return whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    The DNS lookup runs inside the same time limit (in a daemon thread), so the check never hangs on a slow or
    absent resolver. Tests may monkeypatch this function.

    Args:
        host: Host name, e.g. ``"huggingface.co"``.
        port: TCP port.
        timeout: Seconds to wait in total.

    Returns:
        ``True`` if the connection opened in time, else ``False``.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name=f"reachability-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def create_backbone(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    checkpoint_path: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: A lit_mpq backbone (see :func:`~lit_mpq.models.registry.list_backbones`), ``torchvision:<name>``
            (see ``torchvision.models.list_models()``) or a timm model (see ``timm.list_models()``).
        pretrained: Download (or take from the local cache) the library's pretrained weights. lit_mpq's own
            backbones ship no weights: use ``checkpoint_path`` for them.
        num_classes: Output classes; ``None`` keeps the model's default (10 for lit_mpq backbones, 1000 for
            ImageNet models).
        checkpoint_path: Local weights (a plain state_dict or a Lightning ``.ckpt``) loaded with ``strict=True``
            after the model is built. When given, nothing is downloaded, whatever ``pretrained`` says.
        model_kwargs: Further keyword arguments of the model's builder (``timm.create_model``,
            ``torchvision.models.get_model`` or the lit_mpq function), e.g. ``{"img_size": 64, "window_size": 4}`` for
            a small Swin, ``{"aux_logits": False}`` for GoogLeNet.

    Returns:
        The model, in training mode as the library returns it.

    Raises:
        ValueError: If the name is unknown, ``num_classes`` is not positive, or a lit_mpq backbone is asked for
            ``pretrained=True`` without ``checkpoint_path``.
        PretrainedWeightsUnavailableError: If pretrained weights cannot be downloaded and are not cached.
        FileNotFoundError: If ``checkpoint_path`` does not exist.
        ValueError: If a parameter or buffer holds NaN or Inf values (see :func:`check_weights`), or the checkpoint
            cannot be read weights-only (see :func:`load_weights_file`).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty backbone name, got {name!r}. {_where_to_find_names()}")
    name = name.strip()
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise ValueError(f"num_classes must be a positive integer or null (model default), got {num_classes!r}.")
    download = pretrained and checkpoint_path is None

    if is_backbone(name):
        if pretrained and checkpoint_path is None:
            raise ValueError(
                f"Backbone {name!r} is defined by lit_mpq and has no downloadable weights, so pretrained=True needs "
                f"a local file: pass checkpoint_path (e.g. checkpoint_path: ../shared/data/cifar10_resnet20.pt), "
                f"or set pretrained: false to start from random weights."
            )
        fn = get_backbone_fn(name)
        extra = dict(model_kwargs or {})
        model = fn(**extra) if num_classes is None else fn(num_classes=num_classes, **extra)
    elif name.startswith(TORCHVISION_PREFIX):
        model = _create_torchvision(name, name[len(TORCHVISION_PREFIX) :], download, num_classes, model_kwargs)
    else:
        timm_name = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
        model = _create_timm(name, timm_name, download, num_classes, model_kwargs)

    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, strict=True)
        check_weights(model, f"'{Path(checkpoint_path).expanduser()}'", zero_layers=True)
    else:
        # Random initialisation cannot be non-finite, but some libraries zero-initialise heads on purpose: only
        # downloaded weights are checked for all-zero layers.
        check_weights(model, f"the pretrained weights of {name!r}" if download else f"the new {name!r}", download)
    return model


def check_weights(model: nn.Module, source: str, zero_layers: bool = True) -> None:
    """Stop on non-finite weights and warn about all-zero layers.

    A single NaN in one weight silently turns every accuracy and sensitivity of a run into noise, so it is an error
    here, at load time, where the tensor can still be named.

    Args:
        model: The model to check.
        source: Where the weights came from, for the messages (e.g. ``"'weights.pt'"``).
        zero_layers: Also warn about convolution and linear layers whose weight is all zeros.

    Raises:
        ValueError: If a floating-point parameter or buffer holds NaN or Inf values; the message names the first such
            tensor and counts the others.

    Example:
        >>> check_weights(nn.Linear(2, 2), "a new layer")
    """
    bad: list[str] = []
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for tensor_name, tensor in named:
            if not tensor.is_floating_point() or tensor.is_meta or bool(torch.isfinite(tensor).all()):
                continue
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
            bad.append(f"{kind} '{tensor_name}' has {counts} value{'s' if nan + inf > 1 else ''}")
    if bad:
        others = f" ({len(bad) - 1} more non-finite tensor(s))" if len(bad) > 1 else ""
        raise ValueError(
            f"{bad[0][0].upper()}{bad[0][1:]} in {source}{others}. Non-finite weights make every accuracy and "
            "sensitivity meaningless: use weights from a run that did not diverge."
        )
    if not zero_layers:
        return
    zero = [
        f"'{layer_name}' ({type(module).__name__})"
        for layer_name, module in model.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and not module.weight.is_meta
        and module.weight.numel() > 0
        and not bool(module.weight.any())
    ]
    if zero:
        warnings.warn(
            f"All-zero weight in {source}: layer(s) {_first(zero)}. Their output does not depend on their input; "
            "check that these are the weights you meant to load.",
            UserWarning,
            stacklevel=2,
        )


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load local weights into ``model`` in place.

    Accepts a plain state_dict file, a Lightning checkpoint (a dict with ``"state_dict"``) or a dict with
    ``"model"``. Leading ``model.`` (our LightningModule stores the backbone as ``self.model``), ``module.``
    (DataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes are stripped when that makes the keys match.

    Args:
        model: The model to fill.
        path: Path of the file.
        strict: Require the keys to match exactly (as ``nn.Module.load_state_dict``). Shapes must match either way.

    Returns:
        ``model``, for chaining.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file cannot be read weights-only (see :func:`load_weights_file`), holds no state_dict,
            or its keys or shapes do not fit ``model`` (up to five of each kind are listed).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        # The shipped configs give paths relative to the repository root; run from elsewhere, say where we looked.
        where = "" if file.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        raise FileNotFoundError(
            f"Checkpoint file not found: '{file}'{where}. Pass the path of a saved state_dict (.pt/.pth) or of a "
            f"Lightning checkpoint (.ckpt)."
        )
    state = _extract_state_dict(load_weights_file(file), file)
    expected = model.state_dict()
    state = _strip_known_prefixes(state, expected.keys())

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched)}")
    if problems:
        raise ValueError(
            f"Checkpoint '{file}' does not fit {type(model).__name__}: " + "; ".join(problems) + ". Check that the "
            "backbone name and num_classes match the ones the checkpoint was saved with."
        )
    model.load_state_dict(state, strict=strict)
    return model


def backbone_input_size(model: nn.Module) -> tuple[int, int, int]:
    """Return the ``(C, H, W)`` input a backbone expects.

    Looks at ``model.default_input_size`` (lit_mpq backbones), then the image size of a timm patch embedding, then
    timm's ``model.pretrained_cfg["input_size"]``,
    and falls back to the torchvision ImageNet default ``(3, 224, 224)``.

    Args:
        model: A backbone.

    Returns:
        Channels, height and width.
    """
    size: Any = getattr(model, "default_input_size", None)
    if size is None:  # a timm model built for another image size (model_kwargs img_size) says so in its patch embedding
        embed = next((m for m in model.modules() if type(m).__name__ == "PatchEmbed"), None)
        img_size = getattr(embed, "img_size", None)
        if isinstance(img_size, tuple | list) and len(img_size) == 2:
            size = (getattr(getattr(embed, "proj", None), "in_channels", 3), *img_size)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, Mapping):
            size = cfg.get("input_size")
    if size is None:
        return DEFAULT_INPUT_SIZE
    size = tuple(int(s) for s in size)
    assert len(size) == 3, f"input size must be (C, H, W), got {size}"
    return size  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------------
# torchvision and timm


def _create_torchvision(
    name: str, tv_name: str, download: bool, num_classes: int | None, model_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if tv_name not in available:
        close = difflib.get_close_matches(tv_name, available, n=3)
        hint = f" Did you mean: {', '.join(TORCHVISION_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown torchvision model {tv_name!r} (from {name!r}).{hint} List the names with "
            f"torchvision.models.list_models() and write them as 'torchvision:<name>'."
        )
    kwargs: dict[str, Any] = dict(model_kwargs or {}) | ({} if num_classes is None else {"num_classes": num_classes})
    if not download:
        return torchvision.models.get_model(tv_name, weights=None, **kwargs)

    weights = torchvision.models.get_model_weights(tv_name).DEFAULT
    cached = _torch_hub_cache_file(weights.url)
    try:
        if not cached.is_file():
            if not is_host_reachable(TORCHVISION_HOST):
                raise PretrainedWeightsUnavailableError(
                    _unavailable_message(name, f"{TORCHVISION_HOST} is unreachable and '{cached}' is not cached")
                ) from None
            # Into the same cache file that torchvision reads; weights_only, like every load in lit_mpq.
            torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", check_hash=True, weights_only=True)
        # torchvision's builders read the cached file with weights_only=False; it gets there only once it has
        # loaded weights-only here, so nothing but tensors and plain containers is ever unpickled.
        load_weights_file(cached)
        return torchvision.models.get_model(tv_name, weights="DEFAULT", **kwargs)
    except pickle.UnpicklingError:
        raise ValueError(
            f"Refusing to load '{cached}' (downloaded from {weights.url}): it pickles Python objects, which could run "
            "code while loading. Delete the file to download it again."
        ) from None
    except _network_errors() as exc:
        raise PretrainedWeightsUnavailableError(_unavailable_message(name, _short(exc))) from None


def _create_timm(
    name: str, timm_name: str, download: bool, num_classes: int | None, model_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    import timm

    if not timm_name.startswith(_TIMM_PASSTHROUGH_PREFIXES) and not timm.is_model(timm_name):
        raise ValueError(_unknown_message(name, timm.list_models()))
    kwargs: dict[str, Any] = dict(model_kwargs or {}) | ({} if num_classes is None else {"num_classes": num_classes})
    if not download:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    if not timm_name.startswith(_LOCAL_DIR_PREFIX):  # a local folder needs no network
        # Decided before timm is called, so that an offline machine fails in seconds, not after its retries.
        timm_name, kwargs = _timm_source(name, timm_name, kwargs)
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except _network_errors() as exc:
        raise PretrainedWeightsUnavailableError(_unavailable_message(name, _short(exc))) from None


def _timm_source(name: str, timm_name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where timm should take pretrained weights from: unchanged when their host answers, else the local caches.

    Returns the model name and keyword arguments for ``timm.create_model``: with an unreachable host, cached weights
    are passed as a local file (``pretrained_cfg_overlay={"file": ...}``, or a ``local-dir:`` snapshot for
    ``hf-hub:`` names), so timm never tries the network.

    Raises:
        PretrainedWeightsUnavailableError: If the host is unreachable and no cache holds the weights.
    """
    import timm

    for prefix in ("hf-hub:", "hf_hub:"):
        if timm_name.startswith(prefix):
            if is_host_reachable(HF_HUB_HOST):
                return timm_name, kwargs
            repo_id = timm_name[len(prefix) :]
            config = _hf_cached_file(repo_id, "config.json")
            weights = _hf_cached_file(repo_id, *_HF_WEIGHT_FILES)
            if config is not None and weights is not None and config.parent == weights.parent:
                return _LOCAL_DIR_PREFIX + str(config.parent), kwargs
            raise PretrainedWeightsUnavailableError(
                _unavailable_message(name, f"{HF_HUB_HOST} is unreachable and the Hugging Face cache lacks them")
            ) from None

    cfg = timm.models.get_pretrained_cfg(timm_name)
    hf_hub_id = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None) or ""
    if not hf_hub_id and not url:
        return timm_name, kwargs  # no weights anywhere: timm itself says so, without the network
    cached_url = _torch_hub_cache_file(url) if url else None
    if hf_hub_id:
        if is_host_reachable(HF_HUB_HOST):
            return timm_name, kwargs
        filename = getattr(cfg, "hf_hub_filename", None)
        local = _hf_cached_file(hf_hub_id, filename) if filename else _hf_cached_file(hf_hub_id, *_HF_WEIGHT_FILES)
        reason = f"{HF_HUB_HOST} is unreachable and the Hugging Face cache lacks them"
    else:
        host = urlparse(url).hostname or ""
        if (cached_url is not None and cached_url.is_file()) or is_host_reachable(host):
            return timm_name, kwargs  # timm takes the torch hub cache itself before downloading
        local, reason = None, f"{host} is unreachable and '{cached_url}' is not cached"
    if local is None and cached_url is not None and cached_url.is_file():
        local = cached_url  # an older download of the same weights, from the URL timm used before the Hub
    if local is None:
        raise PretrainedWeightsUnavailableError(_unavailable_message(name, reason)) from None
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=str(local))
    return timm_name, {**kwargs, "pretrained_cfg_overlay": overlay}


def _hf_cached_file(repo_id: str, *filenames: str) -> Path | None:
    """The first of ``filenames`` in the local Hugging Face cache (``repo@revision`` allowed), without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    repo, _, revision = repo_id.partition("@")
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):  # else None (not cached) or a "known not to exist" marker
            return Path(found)
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # URLError, ConnectionError, TimeoutError, LocalEntryNotFoundError
    for module, attr in (
        ("huggingface_hub.errors", "HfHubHTTPError"),
        ("huggingface_hub.errors", "OfflineModeIsEnabled"),
        ("httpx", "HTTPError"),
        ("requests", "RequestException"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[attr]), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _torch_hub_cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _unavailable_message(name: str, reason: str) -> str:
    return (
        f"Pretrained weights for {name!r} could not be downloaded: {reason} (is this machine offline?). Supply a "
        f"local checkpoint instead, e.g. in the model config:\n"
        f"    checkpoint_path: /path/to/weights.pth   # a plain state_dict or a Lightning .ckpt\n"
        f"    pretrained: false"
    )


def _unknown_message(name: str, timm_names: list[str]) -> str:
    ours = list_backbones()
    close = difflib.get_close_matches(name, ours, n=3, cutoff=0.5)
    if len(close) < 3:
        close += difflib.get_close_matches(name, timm_names, n=3 - len(close))
    try:
        import torchvision

        if name in torchvision.models.list_models():
            close.insert(0, TORCHVISION_PREFIX + name)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"Unknown backbone {name!r}.{hint} lit_mpq backbones: {', '.join(ours)}. timm models are passed by name "
        f"(list them with timm.list_models('*pattern*'), e.g. 'deit_tiny_patch16_224'); torchvision models need "
        f"the 'torchvision:' prefix (list them with torchvision.models.list_models(), e.g. 'torchvision:resnet18')."
    )


def _where_to_find_names() -> str:
    return (
        f"Use a lit_mpq backbone ({', '.join(list_backbones())}), a timm name (timm.list_models()) or "
        f"'torchvision:<name>' (torchvision.models.list_models())."
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint files


def load_weights_file(path: str | Path) -> Any:
    """Read a ``torch.save`` file with ``torch.load(weights_only=True)``, never unpickling arbitrary objects.

    ``weights_only`` admits tensors, plain containers and numbers, which is all a state_dict or a Lightning
    checkpoint written by ``fit`` holds (checked against Lightning 2.6: its loop, callback and optimizer states and
    ``hyper_parameters`` are plain data), so no extra class is allow-listed. A file that needs anything else could
    run code while loading and is refused, with a one-liner to convert it that the user runs only if they trust it.

    Args:
        path: The file.

    Returns:
        What the file holds, on the CPU.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file pickles Python objects other than tensors and plain containers, or cannot be read.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: '{file}'.")
    try:
        with warnings.catch_warnings():  # torch's note on plain-pickle protocols would only precede our message
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():  # not torch's refusal: a damaged pickle stream
            raise ValueError(f"Could not read checkpoint '{file}' (corrupt or not a torch.save file).") from None
        raise ValueError(
            f"Refusing to load '{file}': it pickles Python objects ({_unpickler_reason(exc)}), which could run code "
            f"while loading; lit_mpq reads checkpoints with torch.load(weights_only=True) only. If you trust the file, "
            f"convert it once and pass weights.pt instead:\n"
            f'    python -c "import torch; c = torch.load({str(file)!r}, weights_only=False); '
            f"torch.save(c.get('state_dict', c), 'weights.pt')\""
        ) from None
    except Exception as exc:  # truncated zip, empty file, garbage: torch raises RuntimeError, EOFError, KeyError...
        detail = str(exc).split(". ")[0].strip()[:200]  # torch's first sentence; the rest is generic advice
        raise ValueError(
            f"Could not read checkpoint '{file}' (corrupt or not a torch.save file): {type(exc).__name__}"
            + (f": {detail}." if detail else ".")
        ) from None


def _unpickler_reason(exc: BaseException) -> str:
    """The specific line of torch's weights-only refusal (e.g. 'unsupported GLOBAL posix.system'), no boilerplate."""
    body = str(exc).split("Check the documentation")[0]
    lines = [line.strip() for line in body.splitlines()[1:] if line.strip()]
    reason = lines[-1].split("WeightsUnpickler error:")[-1].strip() if lines else ""
    return reason.rstrip(".")[:200] or "objects other than tensors and plain containers"


def _extract_state_dict(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(
        f"'{file}' holds no state_dict (found {type(obj).__name__}"
        + (f" with keys {_first(list(obj.keys()))}" if isinstance(obj, Mapping) else "")
        + "). Expected a plain state_dict or a Lightning checkpoint with a 'state_dict' entry."
    )


def _strip_known_prefixes(state: dict[str, torch.Tensor], expected: Any) -> dict[str, torch.Tensor]:
    expected = set(expected)

    def overlap(sd: Mapping[str, Any]) -> int:
        return sum(k in expected for k in sd)

    improved = True
    while improved:
        improved = False
        score = overlap(state)
        for prefix in _STRIP_PREFIXES:
            carrying = [k for k in state if k.startswith(prefix)]
            if not carrying:
                continue
            stripped = {k[len(prefix) :]: state[k] for k in carrying}
            new_score = overlap(stripped)
            if new_score > score or (new_score == score and len(carrying) == len(state)):
                state, improved = stripped, True
                break
    return state


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    return shown + (f", ... ({len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else "")
