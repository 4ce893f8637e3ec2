"""Fetch the official PCam files (Zenodo record 2546921), resumable: `python -m pcamx.data.download --root data/pcam`.

The `.h5.gz` archives download to `<name>.h5.gz.part` (an HTTP Range request resumes them), become `<name>.h5.gz`
only when their md5 matches and are gunzipped through an atomic rename; the meta `.csv` files are served as they
are and checked by md5 too. The sha256 of every extracted file goes into `<root>/SHA256SUMS` for `--verify`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from pcamx.data.layout import SPLITS, all_file_names, split_file_names
from pcamx.runtime import disk
from pcamx.runtime.errors import UserError

ZENODO_URL = "https://zenodo.org/records/2546921/files"

# md5 of each official `.h5.gz` archive (not of the extracted `.h5`). The table in the
# basveeling/pcam README swaps valid and test; these are the values measured on the downloaded
# files in basveeling/pcam issues #1 and #4 (the author confirmed the README was wrong) and the
# ones torchvision's `datasets/pcam.py` uses since pytorch/vision#6644.
PCAM_MD5: dict[str, str] = {
    "camelyonpatch_level_2_split_train_x.h5.gz": "1571f514728f59376b705fc836ff4b63",
    "camelyonpatch_level_2_split_train_y.h5.gz": "35c2d7259d906cfc8143347bb8e05be7",
    "camelyonpatch_level_2_split_valid_x.h5.gz": "d5b63470df7cfa627aeec8b9dc0c066e",
    "camelyonpatch_level_2_split_valid_y.h5.gz": "2b85f58b927af9964a4c15b8f7e8f179",
    "camelyonpatch_level_2_split_test_x.h5.gz": "d8c2d60d490dbd479f8199bdfa0cf6ec",
    "camelyonpatch_level_2_split_test_y.h5.gz": "60a7035772fbdb7f34eb86d4420cf66a",
    # The metadata files are served as they are (no archive): md5 of the .csv itself.
    "camelyonpatch_level_2_split_train_meta.csv": "5a3dd671e465cfd74b5b822125e65b0a",
    "camelyonpatch_level_2_split_valid_meta.csv": "67589e00a4a37ec317f2d1932c7502ca",
    "camelyonpatch_level_2_split_test_meta.csv": "3455fd69135b66734e1008f3af684566",
}

SUMS_FILE = "SHA256SUMS"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class DownloadError(UserError, RuntimeError):
    """A file could not be fetched or extracted; re-running resumes where it stopped."""


class ChecksumError(DownloadError):
    """A downloaded archive does not have the published md5."""


def download_pcam(
    root: str | os.PathLike[str],
    base_url: str = ZENODO_URL,
    files: Iterable[str] | None = None,
    md5s: Mapping[str, str] | None = None,
    progress: bool = True,
    keep_gz: bool = False,
) -> list[Path]:
    """Make `root/<name>` exist for each `.h5` or `.csv` name in `files` (default: all nine); returns those paths.

    `md5s` maps each served file (`<name>.gz` for an `.h5`, the `.csv` itself) to its md5 (default
    `PCAM_MD5`). Raises `DownloadError` on network or
    extraction failure and `ChecksumError` when an archive does not match.
    """
    root = Path(root)
    names = list(all_file_names() if files is None else files)
    # Read the module table at call time so a test can swap it for its own served files.
    md5s = PCAM_MD5 if md5s is None else md5s
    missing = [served_name(n) for n in names if served_name(n) not in md5s]
    if missing:
        # Refuse before downloading gigabytes that could never be verified.
        raise ValueError(f"no md5 known for {', '.join(missing)}")
    root.mkdir(parents=True, exist_ok=True)
    base_url = base_url.rstrip("/")

    done: list[Path] = []
    for name in names:
        final = root / name
        if final.exists():
            tqdm.write(f"{final} already exists, skipping")
            done.append(final)
            continue
        gz_name = served_name(name)
        expected = md5s[gz_name].lower()
        gz = root / gz_name
        if gz.exists() and _md5(gz, progress) != expected:
            # A stray archive (copied in by hand, or from another source) is not trusted.
            tqdm.write(f"{gz} does not match md5 {expected}; downloading it again")
            gz.unlink()
        if not gz.exists():
            part = root / f"{gz_name}.part"
            _fetch(f"{base_url}/{gz_name}?download=1", part, progress)
            actual = _md5(part, progress)
            if actual != expected:
                # A corrupt prefix would poison every later resume, so start over next time.
                part.unlink()
                raise ChecksumError(
                    f"md5 mismatch for {gz_name}: expected {expected}, got {actual}; "
                    "the download was deleted, re-run to fetch it again"
                )
            os.replace(part, gz)
        if gz == final:  # served uncompressed: the verified download is the file
            record_digest(root, name, disk.sha256_file(final, progress))
            done.append(final)
            continue
        record_digest(root, name, _gunzip(gz, final, progress))
        if not keep_gz:
            gz.unlink()
        done.append(final)
    return done


def _fetch(url: str, part: Path, progress: bool) -> None:
    """Download `url` into `part`, continuing from its current size when the server allows it."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "pcamx-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    hint = f"re-running resumes from {part.name}"
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            total = None
            if offset and response.status == 206:
                match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
                if match is None or int(match.group(1)) != offset:
                    raise DownloadError(
                        f"{url} answered a resume with an unexpected Content-Range; delete {part} and re-run"
                    )
                if match.group(2) != "*":
                    total = int(match.group(2))
                mode = "ab"
            else:
                # The server ignored the Range header and sends the whole file: start over.
                offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            if total is None and length is not None:
                total = offset + int(length)
            with open(part, mode) as out, disk.byte_progress(total, part.name.removesuffix(".part"), progress,
                                                             initial=offset) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing left to send: the part is already complete; the md5 check decides.
            return
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}; {hint}") from e
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DownloadError(f"could not download {url}: {reason}; {hint}") from e
    size = part.stat().st_size
    if total is not None and size < total:
        # A dropped connection can look like a clean end of stream; keep the bytes for the resume.
        raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; {hint}")


def served_name(name: str) -> str:
    """The file Zenodo serves for `name`: the gzip archive of an `.h5`, a `.csv` as it is."""
    return f"{name}.gz" if name.endswith(".h5") else name


def _md5(path: Path, progress: bool) -> str:
    return disk.file_digest(path, "md5", progress)


def _gunzip(src: Path, dst: Path, progress: bool) -> str:
    """Extract `src` to `dst` atomically; returns the sha256 of the extracted bytes."""
    digest = hashlib.sha256()
    try:
        with (
            disk.atomic_path(dst) as tmp,
            open(tmp, "wb") as out,
            open(src, "rb") as raw,
            gzip.GzipFile(fileobj=raw) as inp,
            disk.byte_progress(src.stat().st_size, f"gunzip {src.name}", progress) as bar,
        ):
            while chunk := inp.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                # Count compressed bytes consumed: the uncompressed size is not known up front.
                bar.update(raw.tell() - bar.n)
            out.flush()
            os.fsync(out.fileno())
    except disk.DiskFullError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DownloadError(f"could not extract {src} to {dst}: {e}") from e
    return digest.hexdigest()


def read_digests(root: Path) -> dict[str, str]:
    """name → sha256 recorded at extraction (empty when nothing was recorded)."""
    path = root / SUMS_FILE
    if not path.is_file():
        return {}
    pairs = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {name.strip().lstrip("*"): digest for digest, name in pairs}


def record_digest(root: Path, name: str, digest: str) -> None:
    digests = {**read_digests(root), name: digest}
    disk.write_text(root / SUMS_FILE, "".join(f"{d}  {n}\n" for n, d in sorted(digests.items())))


def verify_pcam(root: str | os.PathLike[str], files: Iterable[str] | None = None,
                progress: bool = True) -> dict[str, str]:
    """Re-check each file against the sha256 recorded when it was extracted, else against its official md5 (the
    meta .csv files are served as they are, so theirs applies to the file itself). Returns name → "ok" |
    "damaged" | "missing" | "unverifiable" (an extracted .h5 without a recorded sha256: no official digest of
    the extracted file exists)."""
    root = Path(root)
    digests = read_digests(root)
    result = {}
    for name in (all_file_names() if files is None else files):
        path = root / name
        if not path.is_file():
            result[name] = "missing"
        elif name in digests:
            result[name] = "ok" if disk.sha256_file(path, progress) == digests[name] else "damaged"
        elif name in PCAM_MD5:
            result[name] = "ok" if _md5(path, progress) == PCAM_MD5[name] else "damaged"
        else:
            result[name] = "unverifiable"
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pcamx.data.download",
        description="Download the official PCam .h5.gz and metadata .csv files, verify md5, gunzip (resumable).",
    )
    parser.add_argument("--root", type=Path, default=Path("data/pcam"), help="target directory")
    parser.add_argument("--base-url", default=ZENODO_URL, help="where the .h5.gz files live")
    parser.add_argument("--keep-gz", action="store_true", help="keep the verified .h5.gz archives")
    parser.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to fetch (default: all)"
    )
    parser.add_argument("--verify", action="store_true",
                        help=f"re-check the extracted .h5 and .csv files against the sha256 recorded in {SUMS_FILE} "
                             "(a .csv without one: its official md5); exit 1 unless every file checks out")
    args = parser.parse_args(argv)
    names = [name for split in args.splits for name in split_file_names(split)]
    if args.verify:
        sys.exit(_report_verify(args.root, verify_pcam(args.root, names)))
    try:
        paths = download_pcam(args.root, base_url=args.base_url, files=names, keep_gz=args.keep_gz)
    except DownloadError as e:
        sys.exit(f"error: {e}")
    for path in paths:
        print(path)


def _report_verify(root: Path, result: dict[str, str]) -> int:
    """Print each file's status; exit status 1 unless every file was verified ok (verifying nothing is no pass)."""
    for name, status in result.items():
        print(f"{status:>12}  {root / name}")
    bad = [n for n, status in result.items() if status in ("damaged", "missing")]
    unverifiable = [n for n, status in result.items() if status == "unverifiable"]
    if bad:
        print(f"{len(bad)} file(s) damaged or missing ({', '.join(bad)}): delete them and run `python -m "
              f"pcamx.data.download --root {root}` to fetch them again", file=sys.stderr)
    if unverifiable:
        print(f"{len(unverifiable)} file(s) cannot be verified ({', '.join(unverifiable)}): no sha256 was recorded "
              f"in {root / SUMS_FILE} when they were extracted, and only the .h5.gz archives have official md5s; "
              f"delete them and run `python -m pcamx.data.download --root {root}`, which fetches, checks and "
              "records them", file=sys.stderr)
    return 1 if bad or unverifiable else 0


if __name__ == "__main__":
    main()
