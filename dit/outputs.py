"""Writing outputs that a crash, a kill or someone else's symbolic link cannot corrupt or redirect.

Every output is first written inside a private temporary folder beside it (`tempfile.mkdtemp`: a fresh
random name created exclusively, mode 0700, so nobody else can plant a link inside it), then renamed into
place. A rename replaces a link at the final name itself and never follows it, so nothing outside the
output folder can change. Temporary folders carry the host and process id of their run; `remove_stale_temps`
deletes those of runs that are no longer alive (a killed run's leftovers), and only those.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".dit-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname())[:40] or "host"
# Temporary names: ours (".dit-tmp-HOST-PID-random") and the ones earlier versions wrote beside an output
# (".STEM.tmp-PID.SUFFIX"), which a killed run left behind.
_OURS = re.compile(rf"^{re.escape(TMP_PREFIX)}(?P<host>[^-]+)-(?P<pid>\d+)-")
_LEGACY = re.compile(r"^\..+\.tmp-(?P<pid>\d+)(\.[A-Za-z0-9]+)?$")


class OutputError(ValueError):
    """An output path we refuse to write (a symbolic link at the final name, ...)."""


def private_tmpdir(folder: Path) -> Path:
    """A new folder only this process can enter, inside `folder` (so the final rename stays on one file system)."""
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{_HOST}-{os.getpid()}-", dir=folder))


def check_not_symlink(path: Path, *, replace_link: bool = False, hint: str = "") -> None:
    """Refuse a final output name that is a symbolic link, unless the caller asked to replace the link itself."""
    if os.path.islink(path) and not replace_link:
        raise OutputError(f"output {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); refusing to write "
                          f"through it{hint}")


def atomic_write(path: Path, write: Callable[[Path], None], *, replace_link: bool = False) -> None:
    """write(tmp) into a private temporary folder beside `path`, then rename it over `path` (a file or a folder).

    A folder or a file of the other kind at `path` is moved aside first (a folder cannot be renamed over).
    A symbolic link at `path` is refused unless replace_link, and is then replaced, never followed."""
    path = Path(path)
    check_not_symlink(path, replace_link=replace_link)
    tmpdir = private_tmpdir(path.parent)
    try:
        tmp = tmpdir / path.name
        write(tmp)
        fsync_tree(tmp)
        _move_aside_if_needed(path, tmp, tmpdir)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def atomic_write_text(path: Path, text: str, *, replace_link: bool = False) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), replace_link=replace_link)


def atomic_write_json(path: Path, record: dict, *, replace_link: bool = False) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n", replace_link=replace_link)


def _move_aside_if_needed(path: Path, new: Path, tmpdir: Path) -> None:
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(old.st_mode) or new.is_dir():  # rename() cannot put a folder over a folder or a file
        os.rename(path, tmpdir / ".replaced")


def open_append_nofollow(path: Path):
    """A text file opened for appending that is never reached through a symbolic link (O_NOFOLLOW)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder (symbolic links are not followed)."""
    if path.is_symlink():
        return
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync_path(os.path.join(root, name), os.O_RDONLY)
            fsync_dir(Path(root))
    else:
        _fsync_path(str(path), os.O_RDONLY)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries durable (best effort where folders cannot be opened, e.g. Windows)."""
    try:
        _fsync_path(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EACCES, errno.EISDIR, errno.EBADF):
            raise


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temps(folder: Path) -> list[Path]:
    """Temporary files and folders in `folder` left by runs of this host that are no longer alive, owned by us."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    stale = []
    for entry in entries:
        ours, legacy = _OURS.match(entry.name), _LEGACY.match(entry.name)
        match = ours if ours and ours["host"] == _HOST else legacy
        if match is None or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        if entry.stat(follow_symlinks=False).st_uid == os.geteuid():
            stale.append(Path(entry.path))
    return sorted(stale)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete what `stale_temps` finds (links are unlinked, never followed); returns what was removed."""
    removed = stale_temps(folder)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Media
# ----------------------------------------------------------------------------------------------------------------

MEDIA_FORMATS = ("mp4", "gif", "webp", "png", "jpg", "jpeg")
# Formats that hold one picture: a request of one frame (every image model's, a video model's --frames 1) is
# written as a single file in them; webp also holds animations, png clips are folders of frames, jpg has none.
STILL_FORMATS = ("png", "webp", "jpg", "jpeg")
VIDEO_FORMATS = ("mp4", "gif", "webp", "png")
_PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG", "jpeg": "JPEG"}


def sidecar_path(path: Path) -> Path:
    """The JSON record written beside an output: `clip.mp4` -> `clip.mp4.json`."""
    return path.with_name(path.name + ".json")


def write_video(frames, path: Path, fps: int, *, replace_link: bool = False) -> None:
    """frames: (F, H, W, 3) floats in [0, 1] -> mp4 (H.264 via imageio-ffmpeg), gif, webp, or a folder of PNGs."""
    import imageio.v3 as iio
    import numpy as np

    data = (np.clip(frames, 0, 1) * 255).round().astype("uint8")
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"{path.name}: .{fmt} is not a video format; accepted: {', '.join(VIDEO_FORMATS)}")

    def write(tmp: Path) -> None:
        if fmt == "mp4":
            iio.imwrite(tmp, data, plugin="FFMPEG", fps=fps, codec="libx264",
                        macro_block_size=1, ffmpeg_log_level="error")
        elif fmt == "gif":
            iio.imwrite(tmp, data, extension=".gif", duration=1000 / fps, loop=0)
        elif fmt == "webp":
            iio.imwrite(tmp, data, extension=".webp", duration=1000 / fps, loop=0, lossless=True)
        else:  # png: one file per frame in a folder named like the output
            tmp.mkdir()
            for i, frame in enumerate(data):
                iio.imwrite(tmp / f"frame_{i:04d}.png", frame)

    atomic_write(path, write, replace_link=replace_link)


def write_image(image, path: Path, *, replace_link: bool = False) -> None:
    """image: (H, W, 3) floats in [0, 1] -> one png, webp (lossless) or jpeg (quality 95, no chroma subsampling)
    file, written atomically."""
    import numpy as np
    from PIL import Image

    data = (np.clip(image, 0, 1) * 255).round().astype("uint8")
    fmt = _PIL_FORMATS[path.suffix.lstrip(".").lower()]
    options = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95, "subsampling": 0}}.get(fmt, {})
    atomic_write(path, lambda tmp: Image.fromarray(data).save(tmp, format=fmt, **options), replace_link=replace_link)
