"""Getting the upstream weights at pinned revisions, sha256-checked, into a complete model repository folder.

MOSS-TTS-Nano needs four upstream files that cannot live in git (``.gitignore`` keeps them out):

    pytorch_model.bin                  OpenMOSS-Team/MOSS-TTS-Nano-100M@44502f80…       234,693,095 B  sha256 known
    tokenizer.model                    OpenMOSS-Team/MOSS-TTS-Nano-100M@44502f80…           470,897 B  sha256 known
    audio_tokenizer/config.json        OpenMOSS-Team/MOSS-Audio-Tokenizer-Nano@6aa02b01…      7,385 B  prefix b38892f8
    audio_tokenizer/model.safetensors  OpenMOSS-Team/MOSS-Audio-Tokenizer-Nano@6aa02b01…  87,922,568 B  not published

(left: the path in the repository folder; the upstream file has the same base name in the pinned repository).

Verification. Every file is checked for its size and sha256 (streamed, with a tqdm bar for large files) before it is
placed, and files already in place are checked again on every call. The full sha256 of the two codec files is not
published; for them the size and the known prefix are checked, and the full hash seen at the first successful download
(or at the first check of files placed there by hand) is recorded in ``audio_tokenizer/weights.lock.json`` (trust on
first use); later runs verify against that lock file.
A file that fails is never installed: downloads go to a temporary ``.part`` file beside the destination and are renamed
into place only after they verify; a corrupt file already in the managed folder is removed (and fetched again when a
source is available). Files in a user's ``model_path`` folder are verified but never modified.

Sources. Before a source's first download one TCP connection to it (or to the HTTPS proxy) is tried for at most
``PROBE_TIMEOUT_SECONDS``; when it fails, that source is skipped with one line, so a machine without network gets the
manual instructions in seconds instead of the clients' retries. ``source="hf"`` uses ``huggingface_hub.hf_hub_download(repo_id, filename, revision=<commit>)`` (its cache,
``HF_HOME`` / ``HF_HUB_CACHE``, mirrors through ``HF_ENDPOINT``); with ``HF_HUB_OFFLINE=1`` (or ``offline=True``) only
the local Hugging Face cache is used. ``source="modelscope"`` uses the optional ``modelscope`` package (imported only
when used) with ``openmoss/MOSS-TTS-Nano`` and ``openmoss/MOSS-Audio-Tokenizer-Nano``. ModelScope repositories have
their own git history, so the Hugging Face commit ids do not exist there: ModelScope is pinned to its ``master``
revision, and the content is pinned by the checks above (full sha256 for the TTS files; size, prefix and the lock file
for the codec files). ``source="auto"`` uses files already in place, else the Hugging Face Hub, else ModelScope (the
Hub only, from its cache, when offline). ``source="local"`` never downloads. Downloaded files are copied out of the
client's cache into the repository folder (about 323 MB more disk while the cache is kept; the cache may be deleted).

Layout. After ``ensure_model_files()`` the repository folder is a complete model repository that
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads offline: the TTS files at the root, the codec in
``audio_tokenizer/`` with the upstream ``config.json`` (unchanged: its ``auto_map`` already names
``configuration_moss_audio_tokenizer`` / ``modeling_moss_audio_tokenizer``), ``model.safetensors``, the lock file and
**copies** of our codec modules and the modules they import relatively (remote code only loads ``.py`` files from the
folder it is given). Copies rather than symlinks, so that the folder can be uploaded to the Hub or ModelScope as it is;
they are refreshed on every call when the root modules change.

Safety. This module only hashes, copies and renames files; it never unpickles anything. Loaders read the ``.bin`` with
``torch.load(..., weights_only=True)`` and the codec with safetensors (``measurement.checkpoints.load_checkpoint`` does
both).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping, Sequence

from .audio_io import write_atomically

logger = logging.getLogger(__name__)

# The folder this module sits in: the repository root in a checkout. (Loaded through trust_remote_code it is the
# transformers modules cache, so callers there should pass the model's own folder as target_dir.)
REPO_ROOT = Path(__file__).resolve().parent
CODEC_SUBFOLDER = "audio_tokenizer"
LOCK_FILENAME = "weights.lock.json"
# Suffix of files being downloaded or copied (.gitignore ignores it, so an interrupted run leaves git clean).
PARTIAL_SUFFIX = ".part"

TTS_REPO_ID = "OpenMOSS-Team/MOSS-TTS-Nano-100M"
TTS_REVISION = "44502f80dbf9743528fa921cc544d662c685ebec"
CODEC_REPO_ID = "OpenMOSS-Team/MOSS-Audio-Tokenizer-Nano"
CODEC_REVISION = "6aa02b01e445cc585582cf0ba480bc3ea6c8dd68"
MODELSCOPE_TTS_REPO_ID = "openmoss/MOSS-TTS-Nano"
MODELSCOPE_CODEC_REPO_ID = "openmoss/MOSS-Audio-Tokenizer-Nano"
# ModelScope has no copy of the Hugging Face commits; its branch is pinned and the content is pinned by the hashes.
MODELSCOPE_REVISION = "master"

SOURCES = ("auto", "hf", "modelscope", "local")
# Codec modules copied into audio_tokenizer/ when its config.json has no auto_map to name them.
CODEC_CODE_MODULES = ("configuration_moss_audio_tokenizer", "modeling_moss_audio_tokenizer")
# Hashing/copying shows a progress bar from this size on.
PROGRESS_MIN_BYTES = 8 * 2**20
_CHUNK_BYTES = 2**20
_OFFLINE_VALUES = {"1", "on", "yes", "true"}
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MODELSCOPE_DEFAULT_DOMAIN = "www.modelscope.cn"
# One connection attempt of at most this long decides whether a source is reachable at all (without it, a machine
# without network waited about 95 s through the clients' retries and printed 88 lines of them).
PROBE_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class PinnedFile:
    """One upstream file at a pinned revision and where it goes in the repository folder.

    Attributes:
        name: key in ``ModelFiles.paths`` ("tts_weights", "tokenizer_model", "codec_config", "codec_weights").
        repo_id / revision / filename: the Hugging Face location (revision is a full commit id).
        target: POSIX path of the file inside the repository folder.
        size: exact size in bytes.
        sha256: full hex digest when published, else None (then the lock file pins it after the first download).
        sha256_prefix: known leading hex digits of the digest when the full one is not published.
        modelscope_repo_id / modelscope_revision: the ModelScope location of the same file.
    """

    name: str
    repo_id: str
    revision: str
    filename: str
    target: str
    size: int
    sha256: str | None
    sha256_prefix: str = ""
    modelscope_repo_id: str = ""
    modelscope_revision: str = MODELSCOPE_REVISION

    @property
    def label(self) -> str:
        """Short human name: repo@revision[:8]/filename."""
        return f"{self.repo_id}@{self.revision[:8]}/{self.filename}"

    @property
    def hf_url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"

    @property
    def modelscope_url(self) -> str:
        repo, revision = self.modelscope_repo_id, self.modelscope_revision
        return f"https://modelscope.cn/models/{repo}/resolve/{revision}/{self.filename}"


PINNED: tuple[PinnedFile, ...] = (
    PinnedFile(
        "tts_weights", TTS_REPO_ID, TTS_REVISION, "pytorch_model.bin", "pytorch_model.bin", 234_693_095,
        "24003f2f11ac8a2cbf70514db2d8f1c02fb451aa6b3c0bffc9da09f31cd7caa5", modelscope_repo_id=MODELSCOPE_TTS_REPO_ID,
    ),
    PinnedFile(
        "tokenizer_model", TTS_REPO_ID, TTS_REVISION, "tokenizer.model", "tokenizer.model", 470_897,
        "c353ee1479b536bf414c1b247f5542b6607fb8ae91320e5af1781fee200fddff", modelscope_repo_id=MODELSCOPE_TTS_REPO_ID,
    ),
    PinnedFile(
        "codec_config", CODEC_REPO_ID, CODEC_REVISION, "config.json", f"{CODEC_SUBFOLDER}/config.json", 7_385,
        None, sha256_prefix="b38892f8", modelscope_repo_id=MODELSCOPE_CODEC_REPO_ID,
    ),
    PinnedFile(
        "codec_weights", CODEC_REPO_ID, CODEC_REVISION, "model.safetensors", f"{CODEC_SUBFOLDER}/model.safetensors",
        87_922_568, None, modelscope_repo_id=MODELSCOPE_CODEC_REPO_ID,
    ),
)

# A downloader fetches one pinned file and returns a local path to it (typically inside its own cache).
# Arguments: (pin, offline). offline=True means: use a local cache only, no network.
Downloader = Callable[[PinnedFile, bool], "str | os.PathLike"]


class ChecksumError(ValueError):
    """A file's size or sha256 does not match its pin. Attributes: path, expected (digest or None), actual."""

    def __init__(self, message: str, path: Path, expected: str | None, actual: str):
        super().__init__(message)
        self.path, self.expected, self.actual = path, expected, actual


class WeightsUnavailableError(RuntimeError):
    """A pinned file is neither in place nor obtainable from any allowed source; the message says what to do."""


@dataclass(frozen=True)
class ModelFiles:
    """Verified files of a model repository folder.

    Attributes:
        root: the repository folder (``from_pretrained`` target).
        paths: ``PinnedFile.name`` -> absolute path of the verified file.
    """

    root: Path
    paths: Mapping[str, Path]

    @property
    def tts_weights(self) -> Path:
        return self.paths["tts_weights"]

    @property
    def tokenizer_model(self) -> Path:
        return self.paths["tokenizer_model"]

    @property
    def codec_dir(self) -> Path:
        """The codec folder for ``AutoModel.from_pretrained(codec_dir, trust_remote_code=True)``."""
        return self.root / CODEC_SUBFOLDER

    @property
    def codec_config(self) -> Path:
        return self.paths["codec_config"]

    @property
    def codec_weights(self) -> Path:
        return self.paths["codec_weights"]


def ensure_model_files(
    target_dir: str | os.PathLike = REPO_ROOT,
    source: str = "auto",
    model_path: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: bool = True,
    pins: Sequence[PinnedFile] = PINNED,
    downloaders: Mapping[str, Downloader] | None = None,
    code_dir: str | os.PathLike | None = None,
) -> ModelFiles:
    """Make sure every pinned file is present and verified, downloading what is missing.

    Args:
        target_dir: the repository folder that receives the files (default: this checkout).
        source: "auto" (files in place, else Hugging Face, else ModelScope), "hf", "modelscope" or "local" (never
            download).
        model_path: an existing folder with the files in the layout above; when given, nothing is downloaded or
            written, and the files there are only verified.
        offline: True = no network (Hugging Face cache / ModelScope cache only); None = read ``HF_HUB_OFFLINE``.
        progress: show tqdm bars while hashing or copying large files.
        pins: the files to get (tests pass small fake pins).
        downloaders: source name ("hf", "modelscope") -> Downloader; default: ``hf_downloader()`` and
            ``modelscope_downloader()``. Tests pass fakes.
        code_dir: where the codec ``.py`` modules to copy into ``audio_tokenizer/`` are (default: this module's folder).

    Returns:
        ModelFiles with the verified paths.

    Raises:
        ValueError: unknown source, or model_path is not a folder.
        ChecksumError: a file does not match its pin (the message names the file and both hashes).
        WeightsUnavailableError: a file is missing and could not be fetched (the message says how to get it).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if model_path is not None:
        return _verify_existing_folder(Path(model_path), pins, progress)
    target = Path(target_dir).resolve()
    offline = resolve_offline(offline)
    fetchers = _select_downloaders(source, offline, downloaders)
    paths, unavailable = {}, []
    for pin in pins:
        try:
            paths[pin.name] = _ensure_file(target, pin, fetchers, offline, progress)
        except _NotFetched as missing:
            unavailable.append(missing)
    if unavailable:
        raise WeightsUnavailableError(_unavailable_message(target, unavailable, offline, bool(fetchers)))
    if any(pin.target.startswith(f"{CODEC_SUBFOLDER}/") for pin in pins):
        install_codec_code(target, code_dir)
    return ModelFiles(target, paths)


def verify_file(
    path: str | os.PathLike, pin: PinnedFile, expected_sha256: str | None = None, progress: bool = False
) -> str:
    """Check a file's size and sha256 against its pin.

    Args:
        path: the file.
        pin: what it must match.
        expected_sha256: the full digest to require when ``pin.sha256`` is None (e.g. from the lock file).
        progress: tqdm bar while hashing large files.

    Returns:
        The file's sha256 hex digest.

    Raises:
        ChecksumError: naming the file, the expected and the actual sha256 and sizes.
    """
    path = Path(path)
    digest = sha256_file(path, progress)
    _check_digest(path, pin, path.stat().st_size, digest, expected_sha256)
    return digest


def sha256_file(path: str | os.PathLike, progress: bool = False) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks (tqdm bar from PROGRESS_MIN_BYTES on)."""
    path = Path(path)
    hasher = hashlib.sha256()
    with open(path, "rb") as handle, _progress_bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        for chunk in _chunks(handle):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest()


def resolve_offline(offline: bool | None = None) -> bool:
    """``offline`` when given, else whether ``HF_HUB_OFFLINE`` is set to 1/on/yes/true (read at call time)."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def hf_downloader(cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> Downloader:
    """A Downloader over ``huggingface_hub.hf_hub_download`` (works with huggingface_hub 0.36 and 1.x/2.x).

    Before its first download it tries one connection to the endpoint (``connection_problem``), so that a machine
    without network fails in seconds with one line instead of the client's retries.

    Args:
        cache_dir: Hugging Face cache folder; None = the default (``HF_HUB_CACHE`` / ``HF_HOME``).
        endpoint: the Hub URL; None = ``HF_ENDPOINT`` or https://huggingface.co.
    """
    probe = _ConnectionProbe()

    def download(pin: PinnedFile, offline: bool) -> str:
        # Imported here so that importing this module (e.g. through remote code) stays light.
        from huggingface_hub import hf_hub_download

        if not offline:
            probe.require(endpoint or os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT)
        return hf_hub_download(
            repo_id=pin.repo_id, filename=pin.filename, revision=pin.revision,
            cache_dir=None if cache_dir is None else str(cache_dir), local_files_only=offline, endpoint=endpoint,
        )

    return download


def modelscope_downloader(cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> Downloader:
    """A Downloader over the optional ``modelscope`` package (``model_file_download``), pinned to ``master``.

    Like ``hf_downloader``, it tries one connection before its first download.

    Args:
        cache_dir: ModelScope cache folder; None = the default (``MODELSCOPE_CACHE``).
        endpoint: the site to probe; None = ``MODELSCOPE_DOMAIN`` or www.modelscope.cn.
    """
    probe = _ConnectionProbe()

    def download(pin: PinnedFile, offline: bool) -> str:
        try:
            from modelscope.hub.file_download import model_file_download
        except ImportError as error:
            raise ImportError("the optional package 'modelscope' is not installed (pip install modelscope)") from error
        if not offline:
            domain = os.environ.get("MODELSCOPE_DOMAIN") or MODELSCOPE_DEFAULT_DOMAIN
            probe.require(endpoint or (domain if "://" in domain else f"https://{domain}"))
        # Only pass local_files_only when needed: older modelscope releases do not accept it.
        extra = {"local_files_only": True} if offline else {}
        return model_file_download(
            pin.modelscope_repo_id, pin.filename, revision=pin.modelscope_revision,
            cache_dir=None if cache_dir is None else str(cache_dir), **extra,
        )

    return download


def connection_problem(url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """Why one TCP connection to ``url``'s host (or to the HTTPS proxy, when one is set) fails, or None when it works.

    Args:
        url: e.g. "https://huggingface.co".
        timeout: seconds to wait for the connection.
    """
    address = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(address.scheme or "https")
    if proxy and urllib.request.proxy_bypass(address.hostname or ""):
        proxy = None
    target = urllib.parse.urlsplit(proxy) if proxy else address
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        via = " (the proxy)" if proxy else ""
        return f"no connection to {target.hostname}:{port}{via} within {timeout:g} s: {error.strerror or error}"


class _ConnectionProbe:
    """One connection attempt per URL for the lifetime of a downloader; later files reuse the answer."""

    def __init__(self) -> None:
        self.problems: dict[str, str | None] = {}

    def require(self, url: str) -> None:
        if url not in self.problems:
            self.problems[url] = connection_problem(url)
        if self.problems[url] is not None:
            raise ConnectionError(self.problems[url])


def describe_manual_download(target_dir: str | os.PathLike = REPO_ROOT, pins: Sequence[PinnedFile] = PINNED) -> str:
    """Step-by-step instructions to fetch the pinned files by hand and place them so that offline runs work.

    Args:
        target_dir: the repository folder the files must go to.
        pins: the files to describe.

    Returns:
        Multi-line text: per file its URLs, size, hash and destination; the client commands; the environment variables.
    """
    target = Path(target_dir)
    lines = [f"Get these files on a machine with network access and place them under {target}:"]
    for pin in pins:
        partial = f"{pin.sha256_prefix}... (full hash not published)" if pin.sha256_prefix else "not published"
        digest = pin.sha256 or partial
        lines += [
            f"  {pin.target}  ({pin.size:,} bytes, sha256 {digest})",
            f"      Hugging Face: {pin.hf_url}",
            f"      ModelScope:   {pin.modelscope_url}",
        ]
    lines.append("Or with the command-line clients (huggingface_hub >= 0.34 provides `hf`; modelscope is optional):")
    for (repo_id, revision, ms_repo_id, folder), names in _group_by_repo(pins).items():
        local_dir = target / folder if folder else target
        lines.append(f"  hf download {repo_id} {' '.join(names)} --revision {revision} --local-dir {local_dir}")
        lines.append(f"  modelscope download --model {ms_repo_id} {' '.join(names)} --local_dir {local_dir}")
    lines += [
        "Then run again: the files are verified in place and nothing is downloaded (or pass the folder that holds them",
        "as model_path / --model-path).",
        "Environment variables: HF_HUB_OFFLINE=1 (never use the network: local folder and Hugging Face cache only),",
        "HF_ENDPOINT (a Hugging Face mirror, e.g. https://hf-mirror.com), HF_HOME or HF_HUB_CACHE (cache location),",
        "HTTPS_PROXY (a proxy), MODELSCOPE_CACHE (ModelScope cache location).",
    ]
    return "\n".join(lines)


def install_codec_code(target_dir: str | os.PathLike, code_dir: str | os.PathLike | None = None) -> list[Path]:
    """Copy the codec's remote-code modules (and what they import relatively) into ``target_dir/audio_tokenizer``.

    The modules are the ones named by ``audio_tokenizer/config.json``'s ``auto_map`` (else CODEC_CODE_MODULES). A copy
    is rewritten only when its content differs. When a module is absent from ``code_dir`` nothing is copied and a
    warning says so (the codec then loads through our package, not through ``trust_remote_code`` on the subfolder).

    Returns:
        The paths written or already up to date.
    """
    codec_dir = Path(target_dir) / CODEC_SUBFOLDER
    code_dir = Path(code_dir) if code_dir is not None else REPO_ROOT
    names, missing = _module_closure(code_dir, _auto_map_modules(codec_dir / "config.json") or CODEC_CODE_MODULES)
    if missing:
        logger.warning(
            "Codec code %s not found in %s; %s cannot be loaded with trust_remote_code on its own until it exists",
            ", ".join(f"{name}.py" for name in missing), code_dir, codec_dir,
        )
        return []
    codec_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in sorted(names):
        source, destination = code_dir / f"{name}.py", codec_dir / f"{name}.py"
        content = source.read_bytes()
        same_file = source.resolve() == destination.resolve()
        if not same_file and (not destination.is_file() or destination.read_bytes() != content):
            _write_bytes_atomically(destination, content)
            logger.info("Copied %s to %s", source.name, codec_dir)
        copied.append(destination)
    return copied


def _ensure_file(target: Path, pin: PinnedFile, fetchers: list, offline: bool, progress: bool) -> Path:
    """The verified destination of ``pin`` under ``target``, fetched and installed when missing or corrupt."""
    destination = target / pin.target
    if destination.is_file():
        locked = _locked_sha256(destination)
        try:
            digest = verify_file(destination, pin, locked, progress)
            if pin.sha256 is None and locked is None:  # placed by hand: pin what passed the size/prefix checks
                _record_lock(destination, pin, digest)
            return destination
        except ChecksumError as error:
            destination.unlink()
            if not fetchers:
                message = f"{error} The file was removed."
                raise ChecksumError(message, error.path, error.expected, error.actual) from None
            logger.warning("%s Removed it; fetching it again.", error)
    fetched = _fetch(pin, fetchers, offline)
    _install_verified(Path(fetched), destination, pin, progress)
    return destination


def _fetch(pin: PinnedFile, fetchers: list, offline: bool) -> Path:
    """Path returned by the first downloader that succeeds; _NotFetched listing every failure otherwise."""
    failures = []
    for source_name, download in fetchers:
        try:
            path = Path(download(pin, offline))
        # Clients raise their own error types for a missing network (requests, httpx, OSError, hub errors,
        # ImportError for an absent optional client); every one just means "not from this source".
        except Exception as error:  # noqa: BLE001
            failures.append(f"{source_name}: {type(error).__name__}: {str(error).strip()}")
            continue
        logger.info("Fetched %s from %s", pin.label, source_name)
        return path
    raise _NotFetched(pin, failures or ["no download source allowed (source='local')"])


class _NotFetched(Exception):
    """Internal: one pinned file that no source could provide (collected into one WeightsUnavailableError)."""

    def __init__(self, pin: PinnedFile, failures: list[str]):
        super().__init__(pin.label)
        self.pin, self.failures = pin, failures


def _unavailable_message(target: Path, unavailable: list, offline: bool, could_download: bool) -> str:
    """What is missing, why each source failed (once when every file failed alike), and the manual instructions."""
    lines = [f"Model files missing from {target} that could not be fetched:"]
    shared = all(missing.failures == unavailable[0].failures for missing in unavailable)
    for missing in unavailable:
        lines.append(f"  {missing.pin.target} ({missing.pin.label})")
        if not shared:
            lines += [f"    - {failure}" for failure in missing.failures]
    if shared:
        lines.append("Every file failed the same way:")
        lines += [f"  - {failure}" for failure in unavailable[0].failures]
    if offline and could_download:
        lines.append(
            "Offline mode (HF_HUB_OFFLINE=1 or offline=True): only the local folder and the Hugging Face cache were "
            "searched; unset HF_HUB_OFFLINE (or pass offline=False) to download."
        )
    lines.append(describe_manual_download(target, [missing.pin for missing in unavailable]))
    return "\n".join(lines)


def _install_verified(fetched: Path, destination: Path, pin: PinnedFile, progress: bool) -> None:
    """Copy ``fetched`` to ``destination`` through a verified temporary file; record the lock for unpinned hashes."""
    locked = _locked_sha256(destination)
    if fetched.resolve() == destination.resolve():
        digest = verify_file(destination, pin, locked, progress)
    else:
        digest = _copy_verified(fetched, destination, pin, locked, progress)
    if pin.sha256 is None and locked is None:
        _record_lock(destination, pin, digest)
    logger.info("Installed %s (%s) at %s", pin.label, digest[:12], destination)


def _copy_verified(source: Path, destination: Path, pin: PinnedFile, locked: str | None, progress: bool) -> str:
    """Copy while hashing into a ``.part`` file beside destination; rename it into place only when it verifies."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()

    def copy(temporary: str) -> None:
        with open(temporary, "wb") as out, open(source, "rb") as src:
            with _progress_bar(source.stat().st_size, f"copy {pin.filename}", progress) as bar:
                for chunk in _chunks(src):
                    hasher.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        try:
            _check_digest(source, pin, Path(temporary).stat().st_size, hasher.hexdigest(), locked)
        except ChecksumError as error:
            raise ChecksumError(
                f"{error} It was not installed at {destination}; delete the corrupt copy {source} and run again.",
                error.path, error.expected, error.actual,
            ) from None

    write_atomically(destination, copy, suffix=PARTIAL_SUFFIX)
    return hasher.hexdigest()


def _check_digest(path: Path, pin: PinnedFile, size: int, digest: str, locked: str | None) -> None:
    """Raise ChecksumError when size or digest disagree with the pin (or with the lock file's digest)."""
    expected = pin.sha256 or locked
    if expected:
        bad_hash, shown = digest != expected, expected
    else:
        bad_hash = not digest.startswith(pin.sha256_prefix)
        shown = f"{pin.sha256_prefix}... (only this prefix is published)" if pin.sha256_prefix else "not published"
    if size == pin.size and not bad_hash:
        return
    origin = f"the lock file {path.parent / LOCK_FILENAME}" if locked and not pin.sha256 else pin.label
    raise ChecksumError(
        f"Checksum mismatch for {path}: expected sha256 {shown} and {pin.size:,} bytes ({origin}), "
        f"got sha256 {digest} and {size:,} bytes.",
        path, expected, digest,
    )


def _verify_existing_folder(folder: Path, pins: Sequence[PinnedFile], progress: bool) -> ModelFiles:
    """Verify (never modify) a user's model folder."""
    if not folder.is_dir():
        expected = ", ".join(pin.target for pin in pins)
        raise ValueError(f"model_path {folder} is not a folder; expected a folder holding {expected}")
    missing = [pin for pin in pins if not (folder / pin.target).is_file()]
    if missing:
        raise WeightsUnavailableError(
            f"model_path {folder} lacks {', '.join(pin.target for pin in missing)}.\n"
            + describe_manual_download(folder, missing)
        )
    paths = {}
    for pin in pins:
        path = (folder / pin.target).resolve()
        verify_file(path, pin, _locked_sha256(path), progress)
        paths[pin.name] = path
    return ModelFiles(folder.resolve(), paths)


def _select_downloaders(source: str, offline: bool, downloaders: Mapping[str, Downloader] | None) -> list:
    """(name, Downloader) pairs to try in order for ``source``."""
    if downloaders is None:
        downloaders = {"hf": hf_downloader(), "modelscope": modelscope_downloader()}
    if source == "local":
        return []
    if source == "auto":
        # Offline means the Hugging Face cache only (HF_HUB_OFFLINE's meaning); ModelScope would need the network.
        names = ["hf"] if offline else ["hf", "modelscope"]
    else:
        names = [source]
    return [(name, downloaders[name]) for name in names if name in downloaders]


def _locked_sha256(path: Path) -> str | None:
    """The digest recorded for ``path`` in the lock file of its folder, if any."""
    lock = path.parent / LOCK_FILENAME
    if not lock.is_file():
        return None
    entry = json.loads(lock.read_text(encoding="utf-8")).get(path.name)
    return entry.get("sha256") if isinstance(entry, dict) else None


def _record_lock(path: Path, pin: PinnedFile, digest: str) -> None:
    """Add ``path``'s digest to the lock file of its folder (trust on first use for unpublished hashes)."""
    lock = path.parent / LOCK_FILENAME
    entries = json.loads(lock.read_text(encoding="utf-8")) if lock.is_file() else {}
    entries[path.name] = {"sha256": digest, "size": pin.size, "repo_id": pin.repo_id, "revision": pin.revision}
    _write_bytes_atomically(lock, (json.dumps(entries, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    logger.info("Recorded sha256 %s of %s in %s", digest, path.name, lock)


def _module_closure(code_dir: Path, roots: Iterable[str]) -> tuple[set, list]:
    """Module names reachable from ``roots`` through relative imports in ``code_dir``, and the missing ones."""
    found, missing, pending = set(), [], list(roots)
    while pending:
        name = pending.pop()
        if name in found or name in missing:
            continue
        source = code_dir / f"{name}.py"
        if not source.is_file():
            missing.append(name)
            continue
        found.add(name)
        pending.extend(_relative_imports(source.read_text(encoding="utf-8")))
    return found, sorted(missing)


def _relative_imports(code: str) -> list[str]:
    """Top-level sibling module names of ``from .x import ...`` / ``from . import x`` statements."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names += [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
    return names


def _auto_map_modules(config_path: Path) -> list[str]:
    """Module names in a config.json auto_map ("module.Class" or "repo--module.Class" values)."""
    if not config_path.is_file():
        return []
    auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map") or {}
    values = [v for value in auto_map.values() for v in (value if isinstance(value, list) else [value]) if v]
    return sorted({value.split("--")[-1].rsplit(".", 1)[0] for value in values})


def _group_by_repo(pins: Sequence[PinnedFile]) -> dict:
    """(repo_id, revision, modelscope repo, destination folder) -> upstream file names, in pin order."""
    groups: dict = {}
    for pin in pins:
        folder = str(Path(pin.target).parent) if "/" in pin.target else ""
        groups.setdefault((pin.repo_id, pin.revision, pin.modelscope_repo_id, folder), []).append(pin.filename)
    return groups


def _write_bytes_atomically(path: Path, content: bytes) -> None:
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(content), suffix=PARTIAL_SUFFIX)


def _chunks(handle: BinaryIO) -> Iterable[bytes]:
    while chunk := handle.read(_CHUNK_BYTES):
        yield chunk


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled or total < PROGRESS_MIN_BYTES, leave=False,
    )
