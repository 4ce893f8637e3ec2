"""End-to-end tests of `pcamx.data.download` against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pcamx.data import download
from pcamx.data.download import (
    SUMS_FILE,
    ChecksumError,
    DownloadError,
    download_pcam,
    main,
    served_name,
    verify_pcam,
)
from pcamx.data.layout import all_file_names, file_name, meta_file_name, split_file_names

NAMES = all_file_names()


@dataclass
class FakeZenodo:
    """What the local server serves, and what it saw."""

    payloads: dict[str, bytes]  # the `.h5` contents, by `.h5` name
    archives: dict[str, bytes]  # the served bytes by served name: `.h5.gz` archives, `.csv` files as they are
    base_url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (file, Range header)
    bytes_sent: int = 0
    honour_range: bool = True
    truncate_to: dict[str, int] = field(default_factory=dict)  # send only a prefix, then hang up

    @property
    def md5s(self) -> dict[str, str]:
        return {name: hashlib.md5(data).hexdigest() for name, data in self.archives.items()}


def _handler(state: FakeZenodo) -> type[BaseHTTPRequestHandler]:
    # SimpleHTTPRequestHandler ignores Range, and resuming is what these tests are about.
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = urllib.parse.urlsplit(self.path).path.lstrip("/")
            range_header = self.headers.get("Range")
            state.requests.append((name, range_header))
            data = state.archives.get(name)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if range_header and state.honour_range:
                start = int(range_header.removeprefix("bytes=").removesuffix("-"))
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in state.truncate_to:
                body = body[: state.truncate_to.pop(name)]
            self.wfile.write(body)
            state.bytes_sent += len(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours *_proxy variables; a proxy must never see (or break) the 127.0.0.1 traffic.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def server() -> Iterator[FakeZenodo]:
    rng = random.Random(0)
    # Random bytes make every archive distinct, so a mix-up between files cannot pass unnoticed.
    payloads = {name: rng.randbytes(rng.randrange(40_000, 80_000)) for name in NAMES}
    archives = {served_name(name): gzip.compress(data, mtime=0) if name.endswith(".h5") else data
                for name, data in payloads.items()}
    state = FakeZenodo(payloads=payloads, archives=archives)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _assert_clean(root: Path, expected: list[str]) -> None:
    # No `.part`, `.gz` or extraction temp file may survive a successful run (SHA256SUMS is the record).
    assert sorted(set(os.listdir(root)) - {SUMS_FILE}) == sorted(expected)


def test_full_download_verifies_and_extracts_every_file(server: FakeZenodo, tmp_path: Path) -> None:
    root = tmp_path / "pcam"
    paths = download_pcam(root, base_url=server.base_url, md5s=server.md5s, progress=False)
    assert paths == [root / name for name in NAMES]
    for name in NAMES:
        assert (root / name).read_bytes() == server.payloads[name]
    _assert_clean(root, NAMES)
    assert [r for _, r in server.requests] == [None] * len(NAMES)
    # The digests recorded at extraction are the payloads' own, in sha256sum's format.
    assert (root / SUMS_FILE).read_text() == "".join(
        f"{hashlib.sha256(server.payloads[n]).hexdigest()}  {n}\n" for n in sorted(NAMES))


def test_verify_finds_a_damaged_and_a_missing_file(server: FakeZenodo, tmp_path: Path, capsys) -> None:
    root = tmp_path / "pcam"
    download_pcam(root, base_url=server.base_url, md5s=server.md5s, progress=False)
    assert set(verify_pcam(root, progress=False).values()) == {"ok"}
    with pytest.raises(SystemExit) as ok:
        main(["--root", str(root), "--verify"])
    assert ok.value.code == 0
    damaged = root / NAMES[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (root / NAMES[1]).unlink()
    result = verify_pcam(root, progress=False)
    assert result[NAMES[0]] == "damaged" and result[NAMES[1]] == "missing"
    assert [v for k, v in result.items() if k not in NAMES[:2]] == ["ok"] * (len(NAMES) - 2)
    with pytest.raises(SystemExit) as bad:
        main(["--root", str(root), "--verify"])
    assert bad.value.code == 1
    err = capsys.readouterr().err
    assert "2 file(s) damaged or missing" in err and f"--root {root}" in err


def test_verifying_nothing_fails_and_a_csv_is_checked_against_its_official_md5(
        server: FakeZenodo, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "pcam"
    download_pcam(root, base_url=server.base_url, md5s=server.md5s, progress=False)
    (root / SUMS_FILE).unlink()  # files placed by hand: no sha256 recorded at extraction
    monkeypatch.setattr(download, "PCAM_MD5", server.md5s)  # the stand-in server's files are the official ones
    result = verify_pcam(root, progress=False)
    h5 = [n for n in NAMES if n.endswith(".h5")]
    csv = [n for n in NAMES if n.endswith(".csv")]
    assert {result[n] for n in h5} == {"unverifiable"} and {result[n] for n in csv} == {"ok"}
    with pytest.raises(SystemExit) as refused:
        main(["--root", str(root), "--verify"])
    assert refused.value.code == 1
    err = capsys.readouterr().err
    assert f"{len(h5)} file(s) cannot be verified" in err and all(n in err for n in h5) and "SHA256SUMS" in err
    damaged = root / csv[0]
    damaged.write_bytes(damaged.read_bytes() + b"x")
    assert verify_pcam(root, files=[csv[0]], progress=False) == {csv[0]: "damaged"}


def test_resumes_a_partial_download_with_a_range_request(server: FakeZenodo, tmp_path: Path) -> None:
    name = file_name("valid", "x")
    gz = server.archives[f"{name}.gz"]
    half = len(gz) // 2
    (tmp_path / f"{name}.gz.part").write_bytes(gz[:half])
    download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s=server.md5s, progress=False)
    assert server.requests == [(f"{name}.gz", f"bytes={half}-")]
    assert server.bytes_sent == len(gz) - half
    assert (tmp_path / name).read_bytes() == server.payloads[name]
    _assert_clean(tmp_path, [name])


def test_restarts_when_the_server_ignores_range(server: FakeZenodo, tmp_path: Path) -> None:
    server.honour_range = False
    name = file_name("test", "y")
    gz = server.archives[f"{name}.gz"]
    (tmp_path / f"{name}.gz.part").write_bytes(gz[:100])
    download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s=server.md5s, progress=False)
    assert (tmp_path / name).read_bytes() == server.payloads[name]
    _assert_clean(tmp_path, [name])


def test_complete_part_is_accepted_after_416(server: FakeZenodo, tmp_path: Path) -> None:
    # A run killed between the last byte and the md5 check leaves a complete `.part` behind.
    name = file_name("train", "y")
    (tmp_path / f"{name}.gz.part").write_bytes(server.archives[f"{name}.gz"])
    download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s=server.md5s, progress=False)
    assert (tmp_path / name).read_bytes() == server.payloads[name]
    _assert_clean(tmp_path, [name])


def test_dropped_connection_keeps_the_part_and_a_rerun_resumes(server: FakeZenodo, tmp_path: Path) -> None:
    name = file_name("train", "x")
    gz_name = f"{name}.gz"
    server.truncate_to[gz_name] = 10_000
    with pytest.raises(DownloadError) as excinfo:
        download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s=server.md5s, progress=False)
    message = str(excinfo.value)
    assert f"{server.base_url}/{gz_name}" in message and "resume" in message
    assert (tmp_path / f"{gz_name}.part").read_bytes() == server.archives[gz_name][:10_000]
    assert not (tmp_path / name).exists()

    download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s=server.md5s, progress=False)
    assert server.requests[-1] == (gz_name, "bytes=10000-")
    assert (tmp_path / name).read_bytes() == server.payloads[name]
    _assert_clean(tmp_path, [name])


def test_md5_mismatch_raises_and_leaves_nothing(server: FakeZenodo, tmp_path: Path) -> None:
    name = file_name("valid", "y")
    gz_name = f"{name}.gz"
    wrong = {gz_name: "0" * 32}
    with pytest.raises(ChecksumError) as excinfo:
        download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s=wrong, progress=False)
    message = str(excinfo.value)
    assert gz_name in message and "0" * 32 in message and server.md5s[gz_name] in message
    assert os.listdir(tmp_path) == []


def test_existing_files_are_skipped(
    server: FakeZenodo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    present = file_name("test", "x")
    (tmp_path / present).write_bytes(b"already here")
    other = file_name("test", "y")
    paths = download_pcam(
        tmp_path, base_url=server.base_url, files=[present, other], md5s=server.md5s, progress=False
    )
    assert paths == [tmp_path / present, tmp_path / other]
    assert (tmp_path / present).read_bytes() == b"already here"
    assert [name for name, _ in server.requests] == [f"{other}.gz"]
    assert "skipping" in capsys.readouterr().out


def test_keep_gz_keeps_the_verified_archive(server: FakeZenodo, tmp_path: Path) -> None:
    name = file_name("valid", "x")
    download_pcam(
        tmp_path, base_url=server.base_url, files=[name], md5s=server.md5s, progress=False, keep_gz=True
    )
    assert (tmp_path / f"{name}.gz").read_bytes() == server.archives[f"{name}.gz"]
    _assert_clean(tmp_path, [name, f"{name}.gz"])


def test_a_stray_archive_with_a_wrong_md5_is_fetched_again(server: FakeZenodo, tmp_path: Path) -> None:
    name = file_name("train", "y")
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(b"not pcam"))
    download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s=server.md5s, progress=False)
    assert (tmp_path / name).read_bytes() == server.payloads[name]
    _assert_clean(tmp_path, [name])


def test_unreachable_server_names_the_url(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port any more, so the connection is refused at once.
    base_url = f"http://127.0.0.1:{port}"
    name = file_name("train", "y")
    with pytest.raises(DownloadError, match="resume") as excinfo:
        download_pcam(
            tmp_path, base_url=base_url, files=[name], md5s={f"{name}.gz": "0" * 32}, progress=False
        )
    assert f"{base_url}/{name}.gz" in str(excinfo.value)
    assert not (tmp_path / name).exists()


def test_unknown_md5_is_refused_before_downloading(server: FakeZenodo, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no md5"):
        download_pcam(tmp_path, base_url=server.base_url, md5s={}, progress=False)
    assert server.requests == []


def test_cli_downloads_the_requested_splits(
    server: FakeZenodo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "PCAM_MD5", server.md5s)
    root = tmp_path / "data" / "pcam"
    main(["--root", str(root), "--base-url", server.base_url, "--splits", "valid", "test"])
    expected = [name for s in ("valid", "test") for name in split_file_names(s)]
    for name in expected:
        assert (root / name).read_bytes() == server.payloads[name]
    _assert_clean(root, expected)


def test_cli_exits_with_a_clear_message_on_md5_mismatch(server: FakeZenodo, tmp_path: Path) -> None:
    # The served files are not the real PCam ones, so the published md5s cannot match.
    with pytest.raises(SystemExit) as excinfo:
        main(["--root", str(tmp_path), "--base-url", server.base_url, "--splits", "valid"])
    assert "md5 mismatch" in str(excinfo.value.code)
    assert f"{file_name('valid', 'x')}.gz" in str(excinfo.value.code)
    assert os.listdir(tmp_path) == []


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pcamx.data.download", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "--base-url" in result.stdout and "--keep-gz" in result.stdout


def test_published_md5_table_covers_every_file() -> None:
    assert set(download.PCAM_MD5) == {served_name(name) for name in NAMES}
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in download.PCAM_MD5.values())
    assert len(set(download.PCAM_MD5.values())) == len(download.PCAM_MD5)  # no value pasted twice


def test_a_metadata_csv_is_served_as_is_verified_and_recorded(server: FakeZenodo, tmp_path: Path) -> None:
    name = meta_file_name("test")
    assert served_name(name) == name  # no archive to unpack
    download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s=server.md5s, progress=False)
    assert (tmp_path / name).read_bytes() == server.payloads[name]
    _assert_clean(tmp_path, [name])
    assert verify_pcam(tmp_path, files=[name], progress=False) == {name: "ok"}


def test_a_metadata_csv_with_a_wrong_md5_leaves_nothing(server: FakeZenodo, tmp_path: Path) -> None:
    name = meta_file_name("valid")
    with pytest.raises(ChecksumError, match=name):
        download_pcam(tmp_path, base_url=server.base_url, files=[name], md5s={name: "0" * 32}, progress=False)
    assert os.listdir(tmp_path) == []
