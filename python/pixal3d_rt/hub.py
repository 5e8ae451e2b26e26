"""Weights from the Hugging Face Hub: `--weights TencentARC/Pixal3D` resolved through huggingface_hub.

`resolve` fetches pipeline.json, then each network's `<name>.json` + `<name>.safetensors` from the
repository its pipeline.json entry names (`ckpts/<name>` lies in the same repository; a
`owner/repo/path` entry that the repository does not hold names another one, as upstream's loader
reads it: TRELLIS-image-large's SS decoder), DINOv3 (camenduru/dinov3-vitl16-pretrain-lvd1689m)
and NAF (a GitHub release file, not on the Hub: torch's hub cache, where upstream's torch.hub puts
it). Everything goes through the Hugging Face cache, so a second run downloads nothing;
HF_HUB_OFFLINE=1 reads the cache only. huggingface_hub's own bars show the downloads.

Verification: a cached file is a link to `blobs/<hash>`, the hash being the sha256 of LFS files and
the git blob sha1 of small ones; each blob is hashed once and remembered (size, mtime) in
`$XDG_CACHE_HOME/pixal3d-rt/verified.json`, so later runs hash only new or changed blobs. A
mismatch names the blob to delete.

`download` fetches everything, and with `dest` lays it out as a weights directory in the official
layout (hard links into the cache where possible, copies otherwise) for `--weights DIR`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import CheckpointError

DEFAULT_REPO = "TencentARC/Pixal3D"
DINOV3_REPO = "camenduru/dinov3-vitl16-pretrain-lvd1689m"
DINOV3_FILES = ("config.json", "model.safetensors")
NAF_URL = "https://github.com/valeoai/NAF/releases/download/model/naf_release.pth"
OFFLINE_FIX = "run `pixal3d-rt download` on a machine with internet (or unset HF_HUB_OFFLINE)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_BAR_MIN_BYTES = 256 << 20  # hashing less than this takes under a second: no bar


def is_hub_id(ref: str) -> bool:
    """`owner/name` as the Hub spells repository ids (a relative path of two parts looks the same:
    the caller tries the directory first)."""
    return bool(_HUB_ID.match(ref))


# ---------------------------------------------------------------------------------------------
# settings read when used (huggingface_hub reads its environment once, at import)


def _truthy(value) -> bool:
    return str(value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _bars_disabled() -> bool:
    from huggingface_hub.utils import are_progress_bars_disabled

    return are_progress_bars_disabled() or _truthy(os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))


def verified_json() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pixal3d-rt" / "verified.json"


def _say(progress):
    """A one-line reporter from what callers pass: None, a callable, or a pixal3d_rt Progress (its `note`)."""
    if progress is None:
        return lambda msg: None
    return getattr(progress, "note", progress)


def _short(e: BaseException) -> str:
    from .checkpoints import _short

    return _short(e)


# ---------------------------------------------------------------------------------------------
# fetching


class _Fetcher:
    """Files through the Hugging Face cache, cache first: a cached file is used without asking the Hub
    (huggingface_hub would send a HEAD request per file, retried for about 20 s each when the Hub
    cannot be reached); a missing one is downloaded unless offline. `refresh` (pixal3d-rt download)
    asks the Hub for each repository's current commit first. The first file of a repository pins it
    to the commit it came from, so every file of a repository comes from one commit."""

    def __init__(self, refresh: bool = False, say=None):
        self.refresh, self.pins = refresh, {}
        if refresh and not offline() and not _hub_reachable():
            self.refresh = False
            (say or print)("[weights] the Hugging Face Hub cannot be reached: using the cache as it is")

    def __call__(self, repo: str, filename: str, revision=None) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        revision = self.pins.get(repo, revision)
        off = offline()
        path = None
        if not (self.refresh and repo not in self.pins) or off:
            try:
                path = hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache_dir()), local_files_only=True)
            except LocalEntryNotFoundError:
                if off:
                    raise CheckpointError(f"{repo}/{filename}: not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE "
                                          f"is set; {OFFLINE_FIX}") from None
            except OSError as e:
                raise CheckpointError(f"{repo}/{filename}: unreadable in the Hugging Face cache ({_short(e)})") from None
        if path is None:
            path = _download(repo, filename, revision)
        path = Path(path)
        try:  # <cache>/models--<owner>--<name>/snapshots/<commit>/<filename>
            self.pins.setdefault(repo, path.relative_to(cache_dir() / ("models--" + repo.replace("/", "--")) / "snapshots").parts[0])
        except ValueError:
            pass
        return path


def _download(repo: str, filename: str, revision=None) -> str:
    """hf_hub_download online; every failure is one CheckpointError line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo}/{filename}"
    try:
        return hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache_dir()))
    except LocalEntryNotFoundError as e:  # the Hub did not answer and the cache does not hold the file
        raise CheckpointError(f"{where}: not in the Hugging Face cache and the Hub cannot be reached ({_short(e)}); "
                              "check the connection, or run `pixal3d-rt download` on a machine with internet") from None
    except GatedRepoError:
        raise CheckpointError(f"{repo}: a gated repository; accept its terms on huggingface.co, then log in "
                              "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo}: repository not found on the Hugging Face Hub (a private one needs a login: "
                              "`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo}: revision '{revision}' not found on the Hugging Face Hub") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{where}: no such file in the repository (is {repo} a Pixal3D weights repository?)") from None
    except OSError as e:  # HfHubHTTPError, requests' connection errors and timeouts, a full disk
        raise CheckpointError(f"{where}: download failed ({_short(e)}); run the command again to resume") from None


def _cached(repo: str, filename: str, revision=None) -> bool | None:
    """What the cache knows: True (cached), False (huggingface_hub recorded that the file does not exist), None."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename, cache_dir=str(cache_dir()), revision=revision)
    return True if isinstance(hit, str) else (None if hit is None else False)


def _in_repo(repo: str, filename: str, revision=None) -> bool | None:
    """Whether the Hub's `repo` holds `filename` (None when the Hub cannot be asked)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if offline():
        return None
    try:
        hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache_dir()))
        return True
    except LocalEntryNotFoundError:  # the Hub did not answer
        return None
    except EntryNotFoundError:  # a 404, recorded in the cache (.no_exist): asked once per commit
        return False
    except OSError:
        return None


def split_ref(repo_id: str, ref: str, revision=None) -> tuple[str, str, str | None]:
    """A pipeline.json model entry -> (repository, path in it without extension, revision).
    `ckpts/<name>` lies in `repo_id`; `owner/repo/path`, when `repo_id` does not hold it, names another
    repository (upstream tries the pipeline's own repository first, then the Hub id). Cache first:
    the Hub is asked only when the cache cannot tell."""
    parts = ref.strip("/").split("/")
    if len(parts) < 3 or not is_hub_id("/".join(parts[:2])):
        return repo_id, ref, revision
    other = ("/".join(parts[:2]), "/".join(parts[2:]), None)
    own = _cached(repo_id, ref + ".json", revision)
    if own is None and not _cached(other[0], other[1] + ".json"):
        own = _in_repo(repo_id, ref + ".json", revision)
    return (repo_id, ref, revision) if own else other


def _hub_reachable() -> bool:
    """One quick request to the Hub's endpoint (huggingface_hub retries unreachable requests for ~20 s each)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=10)
        return True
    except Exception:  # requests' or httpx's connection errors and timeouts
        return False


def naf_file(progress=None) -> Path:
    """NAF's release file in torch's hub cache ($TORCH_HOME/hub/checkpoints, where upstream's torch.hub
    puts it), downloaded there when missing and online."""
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / NAF_URL.rsplit("/", 1)[1]
    if path.is_file():
        return path
    if offline():
        raise CheckpointError(f"{path}: NAF checkpoint not in torch's hub cache and HF_HUB_OFFLINE is set; {OFFLINE_FIX}")
    _say(progress)(f"downloading {NAF_URL}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # writes a temporary file and renames it: never a partial naf_release.pth
        torch.hub.download_url_to_file(NAF_URL, str(path), progress=not _bars_disabled())
    except Exception as e:  # urllib's URLError/HTTPError, timeouts, a full disk
        raise CheckpointError(f"{NAF_URL}: download failed ({_short(e)}); run the command again, or save the file "
                              f"as {path}") from None
    return path


def _resolve(repo_id: str, need, progress, revision, refresh: bool = False) -> tuple:
    """(WeightFiles, [(file, path in a weights directory)]) with every file in the caches, verified."""
    from .checkpoints import DINOV3_DIRS, WeightFiles, _pipeline_args, wanted_models

    say = _say(progress)
    say(f"[weights] {repo_id} through the Hugging Face cache {cache_dir()}" + (" (offline)" if offline() else ""))
    fetch = _Fetcher(refresh, say)
    pj = fetch(repo_id, "pipeline.json", revision)
    args = _pipeline_args(pj)
    placed = [(pj, "pipeline.json")]
    bases = {}
    for key in wanted_models(need):
        ref = args["models"].get(key)
        if not isinstance(ref, str):
            raise CheckpointError(f"{pj}: no entry for model '{key}'")
        repo, path, rev = split_ref(repo_id, ref, fetch.pins.get(repo_id, revision))
        for ext in (".json", ".safetensors"):
            f = fetch(repo, path + ext, rev)
            placed.append((f, path + ext))
        bases[key] = f.parent / Path(path).name
    for name in DINOV3_FILES:
        f = fetch(DINOV3_REPO, name)
        placed.append((f, f"{DINOV3_DIRS[0]}/{name}"))
    dino = f.parent
    naf = naf_file(progress)
    placed.append((naf, naf.name))
    if naf.with_suffix(".json").is_file():  # a NAF config beside it (non-default NAF; the release has none)
        placed.append((naf.with_suffix(".json"), naf.with_suffix(".json").name))
    verify([f for f, _ in placed], progress)
    return WeightFiles(repo_id, pj, args, bases, dino, naf), placed


def resolve(repo_id: str, need=None, progress=None, revision=None, refresh: bool = False):
    """The files of Hub repository `repo_id` (and of the repositories it names) as a WeightFiles, in
    the Hugging Face cache. Cache first: cached files are used without asking the Hub, missing ones
    downloaded (HF_HUB_OFFLINE: never); `refresh` asks the Hub for newer commits first. `need` limits
    the pipeline networks fetched. Every file is verified (`verify`)."""
    return _resolve(repo_id, need, progress, revision, refresh)[0]


# ---------------------------------------------------------------------------------------------
# verification


def _blob(path: Path) -> tuple[Path, str] | None:
    """(blob file, expected hash) of a file in the Hugging Face cache; None for anything else
    (e.g. a cache on a file system without links holds copies, named by nothing)."""
    blob = Path(os.path.realpath(path))
    if blob.parent.name == "blobs" and (_SHA256.match(blob.name) or _SHA1.match(blob.name)):
        return blob, blob.name
    return None


def _git_blob_sha1(path: Path) -> str:
    import hashlib

    data = path.read_bytes()  # only small (non-LFS) files are named by their git sha1
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _size_problem(blob: Path, name: str, size: int) -> str | None:
    """Cheap plausibility before hashing: empty, or a safetensors file shorter or longer than its header says."""
    if size == 0:
        return "empty file"
    if name.endswith(".safetensors"):
        try:
            with open(blob, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    return f"{size} bytes, shorter than its safetensors header"
                header = json.loads(f.read(n))
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
        except (ValueError, KeyError, TypeError, IndexError, OSError, UnicodeDecodeError):
            return "unreadable safetensors header"
        if 8 + n + end != size:
            return f"{size} bytes, its safetensors header says {8 + n + end}"
    return None


def _read_verified(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def verify(files, progress=None) -> dict:
    """Check every cached file against the hash its blob is named by (sha256: LFS files; git sha1: small
    files), hashing only blobs not verified before at the same size and mtime. Returns
    {"files", "hashed", "bytes_hashed"}; raises CheckpointError naming the blob to delete."""
    from tqdm import tqdm

    from .files import atomic_write_bytes, sha256_file

    memo_path = verified_json()
    memo = _read_verified(memo_path)
    todo = []
    for f in files:
        found = _blob(f)
        if found is None:
            continue
        blob, expected = found
        st = blob.stat()
        if memo.get(str(blob)) == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            continue
        problem = _size_problem(blob, Path(f).name, st.st_size)
        if problem:
            raise CheckpointError(f"{f}: corrupt download ({problem}); delete {blob} and run again")
        todo.append((f, blob, expected, st))
    total = sum(st.st_size for *_, st in todo)
    if todo:
        _say(progress)(f"[weights] verifying {len(todo)} new file(s), {total / 1e9:.2f} GB")
    with tqdm(total=total, desc="verifying sha256", unit="B", unit_scale=True, unit_divisor=1024,
              disable=total < _BAR_MIN_BYTES or _bars_disabled()) as bar:
        for f, blob, expected, st in todo:
            kind = "sha256" if len(expected) == 64 else "git sha1"
            digest = sha256_file(blob, progress=bar.update) if kind == "sha256" else _git_blob_sha1(blob)
            if digest != expected:
                raise CheckpointError(f"{f}: corrupt download ({kind} {digest[:12]}..., expected {expected[:12]}...); "
                                      f"delete {blob} and run again")
            memo[str(blob)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if todo:
        memo = {k: v for k, v in memo.items() if os.path.exists(k)}  # forget deleted blobs
        try:
            atomic_write_bytes(memo_path, json.dumps(memo, indent=0, sort_keys=True).encode())
        except OSError:
            pass  # a read-only cache: verify again next time
    return {"files": len(files), "hashed": len(todo), "bytes_hashed": total}


# ---------------------------------------------------------------------------------------------
# download


def _place(src: Path, dst: Path) -> None:
    """`dst` = the content of `src`: a hard link to the cached blob where the file system allows,
    a copy otherwise; written under a temporary name and renamed (never a partial file)."""
    real = Path(os.path.realpath(src))
    if dst.exists() and os.path.samefile(real, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    if tmp.exists():
        tmp.unlink()
    try:
        try:
            os.link(real, tmp)
        except OSError:
            shutil.copyfile(real, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def download(repo_id: str = DEFAULT_REPO, dest=None, progress=None, revision=None):
    """Fetch every file of the pipeline (all networks, DINOv3, NAF) into the caches and check them all
    (`check_weights`). With `dest`, lay them out there as a weights directory in the official layout
    (DIR/pipeline.json, DIR/ckpts/..., DIR/dinov3-vitl16-pretrain-lvd1689m/, DIR/naf_release.pth).
    Returns the WeightFiles of the directory, or of the caches."""
    from .checkpoints import check_weights, weight_files_from_dir

    files, placed = _resolve(repo_id, None, progress, revision, refresh=True)
    if dest is not None:
        dest = Path(dest)
        if dest.exists() and not dest.is_dir():
            raise CheckpointError(f"{dest}: exists and is not a directory")
        try:
            for src, rel in placed:
                _place(src, dest / rel)
        except OSError as e:
            raise CheckpointError(f"{dest}: cannot write the weights directory ({_short(e)})") from None
        files = weight_files_from_dir(dest)
        _say(progress)(f"[weights] laid out in {dest}")
    check_weights(files)
    return files
