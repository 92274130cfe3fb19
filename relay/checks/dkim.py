"""DKIM (RFC 6376) verification and signing."""

from __future__ import annotations

import asyncio
import base64
import functools
import re
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dkim
import dkim.util
import dns.exception
import dns.name
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy

from relay.checks.bodyhash import BodyHash, BodyHashSpec, hash_body
from relay.checks.dns import DnsTempError, Resolver
from relay.message import Tail, pieces

# RFC 8601 section 2.7.1 result values for the dkim method.
DkimResult = Literal["pass", "fail", "neutral", "policy", "none", "temperror", "permerror"]
Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

# How the message-level result is chosen from several signatures: the best-ranked one.
# RFC 6376 section 6.1 lets any one valid signature stand for the message, so "pass"
# wins. Next comes "temperror": trying again later may still give a pass, so a rule
# should be able to defer rather than reject. "policy" (cryptographically valid, but
# unacceptable to us: l= or From not signed) is a definite non-pass that still proves
# the signer touched the message; "neutral" marks signatures left unprocessed.
# "permerror" (a signature we cannot evaluate: no key, bad key, broken tags) says
# nothing about the message, so it ranks above "fail" (a signature that does not match
# the message: it was changed after signing).
_RANK: dict[str, int] = {
    "pass": 0,
    "temperror": 1,
    "policy": 2,
    "neutral": 3,  # only for signatures past MAX_SIGNATURES, which were not processed
    "permerror": 4,
    "fail": 5,
}
_ALGORITHMS: frozenset[bytes] = frozenset({b"rsa-sha256", b"ed25519-sha256"})
# RFC 6376 section 6.1: verifiers may limit how many signatures they try, so a message
# carrying hundreds of them cannot make us do hundreds of key lookups.
MAX_SIGNATURES = 10
_SKIPPED = f"not evaluated: more than {MAX_SIGNATURES} signatures"


@dataclass(frozen=True, slots=True)
class DkimSignatureResult:
    """The verdict on one DKIM-Signature header field, in header order."""

    domain: str
    selector: str
    result: DkimResult
    reason: str = ""
    algorithm: str = ""


@dataclass(frozen=True, slots=True)
class DkimOutcome:
    """What verification found: the message-level ``result`` (best signature, see
    ``_RANK``; "none" when unsigned), the d= of a passing signature, and each signature."""

    result: DkimResult
    domain: str = ""
    signatures: tuple[DkimSignatureResult, ...] = ()
    reason: str = ""  # why, when the message as a whole could not be examined
    # The body hashes computed on the way (the signatures' and those asked for with
    # verify_dkim's ``also``): sign() takes SIGNING_BODY's instead of reading the body again.
    body_hashes: Mapping[BodyHashSpec, BodyHash] = field(
        default_factory=dict, repr=False, compare=False
    )


class _KeyUnavailable(Exception):
    """Raised inside dkimpy's dnsfunc. Deliberately not a DKIMException: dkimpy turns
    those (and its own DnsTimeoutError) into a plain False, which would make a DNS
    outage look like a forged signature."""


@dataclass(frozen=True, slots=True)
class _Signature:
    index: int
    domain: str
    selector: str
    algorithm: str
    problem: str = ""  # set when the header itself is unusable (permerror)
    body: BodyHashSpec | None = None  # the body hash it needs; None: bad c=, a= or l=

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"  # RFC 6376 section 3.6.2.1


# A fetched key record: its text, None when there is none, or why it could not be had.
_KeyRecord = bytes | None | DnsTempError


# Of the check's budget, the share key lookups may use; the rest is kept for parsing,
# hashing and the public-key arithmetic, so a key that never answers costs its own
# signature a temperror, never the verdicts of the others.
KEY_SHARE = 0.8


def signed(message: bytes) -> bool:
    """Whether the header section (the message up to its first empty line) names a
    DKIM-Signature at all."""
    end = message.find(b"\r\n\r\n")
    return b"dkim-signature" in message[: end if end >= 0 else len(message)].lower()


async def verify_dkim(
    resolver: Resolver, message: bytes, *, timeout: float, executor: Executor | None = None,
    tail: Tail | None = None, also: Collection[BodyHashSpec] = (),
) -> DkimOutcome:
    """Verify every DKIM-Signature of ``message`` (raw bytes, CRLF line endings), or of a
    large message given as its in-memory part (with the whole header section) and the
    ``tail`` on disk, which is read in pieces (relay.message.pieces), never whole. The
    body hashes in ``also`` are computed in the same pass, when the message is signed
    (DkimOutcome.body_hashes).

    Keys are fetched on the event loop through ``resolver``, each lookup bounded by
    KEY_SHARE of ``timeout`` (and never longer than the resolver's own bound); parsing,
    hashing and the public-key arithmetic run in ``executor`` (default: asyncio's thread
    pool). Never raises: running out of ``timeout`` or failing to fetch a key is
    ``temperror`` for the signatures concerned.
    """
    if not signed(message):
        # Most mail from app servers is unsigned: no thread hop, no parse.
        return DkimOutcome("none")
    loop = asyncio.get_running_loop()
    key_deadline = loop.time() + timeout * KEY_SHARE
    signatures: list[_Signature] = []
    keys: dict[str, _KeyRecord] = {}
    body_hashes: Mapping[BodyHashSpec, BodyHash] = {}
    try:
        async with asyncio.timeout(timeout):
            parse = functools.partial(_parse, message, tail, also)
            verifier, signatures = await loop.run_in_executor(executor, parse)
            if not signatures:
                return DkimOutcome("none")
            body_hashes = verifier.body_hashes
            names = sorted({s.key_name for s in signatures if not s.problem})
            budget = key_deadline - loop.time()
            records = await asyncio.gather(*(_fetch_key(resolver, n, budget) for n in names))
            keys = dict(zip(names, records, strict=True))
            work = functools.partial(_verify_all, verifier, signatures, keys)
            results = await loop.run_in_executor(executor, work)
    except TimeoutError:
        why = f"not verified within {timeout:g}s"
        if not signatures:
            return DkimOutcome("temperror", reason=why)
        results = [
            DkimSignatureResult(s.domain, s.selector, "temperror", why, s.algorithm)
            for s in signatures
        ]
    except dkim.DKIMException as exc:
        # The header section cannot be parsed (RFC 5322 syntax), so no signature in it
        # can be evaluated.
        return DkimOutcome("permerror", reason=f"unparsable message: {reason_text(exc)}")
    except Exception as exc:
        # A failure of ours says nothing about the message: temporary, never "fail".
        return DkimOutcome("temperror", reason=f"internal error ({type(exc).__name__})")
    return _outcome(results, body_hashes)


def _outcome(
    results: Sequence[DkimSignatureResult], body_hashes: Mapping[BodyHashSpec, BodyHash]
) -> DkimOutcome:
    best = min(results, key=lambda r: _RANK[r.result])
    domain = best.domain if best.result == "pass" else ""
    return DkimOutcome(best.result, domain, tuple(results), body_hashes=body_hashes)


async def _fetch_key(resolver: Resolver, name: str, budget: float) -> _KeyRecord:
    """The key record at ``name``, fetched within ``budget`` seconds."""
    try:
        async with asyncio.timeout(max(budget, 0.0)):
            records = await resolver.txt(name, lifetime=budget)
    except DnsTempError as exc:
        return exc
    except TimeoutError:
        return DnsTempError(f"{name} TXT: no answer within {max(budget, 0.0):.2g}s")
    # RFC 6376 section 6.1.2: with several key records the verifier may pick one.
    return records[0] if records else None


_BYTES_REPR = re.compile(r"""\bb(['"])(.*?)\1""")
_MAX_REASON = 200


def reason_text(exc: BaseException | str) -> str:
    """An exception's text fit for a reason= (RFC 8601 section 2.7): dkimpy puts Python
    bytes reprs in its messages (b'...'), which are shown as their plain content; the
    text is bounded so that the field stays readable."""
    text = _BYTES_REPR.sub(r"\2", str(exc))
    text = _CONTROL.sub("", text)
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _parse(
    message: bytes, tail: Tail | None, also: Collection[BodyHashSpec]
) -> tuple[_Verifier, list[_Signature]]:
    """Parse the header section once, describe each DKIM-Signature and compute, in one
    pass over the body, every body hash they need and those in ``also`` (worker
    thread; none at all when nothing is signed)."""
    header_section, body_start = split_message(message, tail)
    verifier = _Verifier(header_section)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    signatures = [_describe(verifier, i) for i in range(count)]
    specs = {s.body for s in signatures if s.body is not None and not s.problem}
    if specs:
        verifier.body_hashes = hash_body(specs | set(also), pieces(body_start, tail))
    return verifier, signatures


_EMPTY_LINE = re.compile(rb"(?:\A|(?<=\n))\r?\n")


def split_message(message: bytes, tail: Tail | None = None) -> tuple[bytes, bytes]:
    """``message`` as its header section (with the empty line that ends it) and the
    start of its body. Where dkimpy's rfc822_parse ends the header: at the first empty
    line, LF or CRLF; without one, the message is all header.

    A large message must have its whole header section in memory (relay/inbound/
    protocol.py keeps twice max_header_size there, and the DATA checks refuse a longer
    header section): anything else is a ValueError."""
    found = _EMPTY_LINE.search(message)
    if found is None:
        if tail is not None:
            raise ValueError("the header section of a large message is not all in memory")
        return message, b""
    return message[: found.end()], message[found.end() :]


def _body_spec(tags: dict[bytes, bytes]) -> BodyHashSpec:
    """The body hash a signature's tags ask for, read as dkimpy reads them
    (DomainSigner.verify_sig_process): the same c=, a= and l= values raise the same
    errors."""
    canon = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    algorithm: str = dkim.HASH_ALGORITHMS[tags[b"a"]]().name
    limit = int(tags[b"l"]) if b"l" in tags else None
    return BodyHashSpec(canon.body_algorithm.name.decode(), algorithm, limit)


class _Verifier(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type hints
    """dkimpy's verifier given the header section alone: the body hashes were computed
    beforehand from the streamed body (``body_hashes``, relay/checks/bodyhash.py), so
    the body hash check of DomainSigner.verify_sig_process (dkimpy 1.1.8), which hashes
    ``self.body`` in one piece, is done here in its place, with the same error; dkimpy
    does the rest (header hash, signature arithmetic, key size)."""

    def __init__(self, header_section: bytes) -> None:
        super().__init__(header_section)
        self.body_hashes: dict[BodyHashSpec, BodyHash] = {}

    def verify_sig_process(
        self, sig: dict[bytes, bytes], include_headers: list[bytes], sig_header: Any,
        dnsfunc: Any,
    ) -> Any:
        spec = self._precomputed(sig)
        if spec is not None:
            computed = self.body_hashes[spec].digest
            if computed != base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"])):
                raise dkim.ValidationError(
                    f"body hash mismatch (got {base64.b64encode(computed).decode()}, "
                    f"expected {_text(sig[b'bh'])})"
                )
            sig = {tag: value for tag, value in sig.items() if tag != b"bh"}
        return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def _precomputed(self, sig: dict[bytes, bytes]) -> BodyHashSpec | None:
        """The body hash ``sig`` needs, or None where dkimpy raises before it compares
        one: a key for TLS reports (s=tlsrpt, we never verify those), a bad c= or l=."""
        if b"bh" not in sig or self.seqtlsrpt:
            return None
        try:
            return _body_spec(sig)
        except Exception:
            return None

    def canonical_length(self, spec: BodyHashSpec) -> int:
        return self.body_hashes[spec].canonical_length


def _describe(verifier: _Verifier, index: int) -> _Signature:
    raw = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"][index]
    try:
        tags = dkim.util.parse_tag_value(raw)
    except Exception:
        tags = {}
    domain, selector, algorithm = (
        _text(tags.get(b"d", b"")),
        _text(tags.get(b"s", b"")),
        _text(tags.get(b"a", b"")),
    )
    if index >= MAX_SIGNATURES:
        return _Signature(index, domain, selector, algorithm, _SKIPPED)
    try:
        # Tag syntax, required tags, t=/x= (RFC 6376 section 6.1.1): a bad header is
        # PERMFAIL, i.e. permerror.
        verifier.verify_headerprep(index)
    except Exception as exc:
        return _Signature(
            index, domain, selector, algorithm, f"bad signature header: {reason_text(exc)}"
        )
    if tags.get(b"a") not in _ALGORITHMS:
        # RFC 8301 section 3.1: rsa-sha1 signatures must not be considered valid.
        return _Signature(index, domain, selector, algorithm, f"unacceptable a={algorithm}")
    try:
        dns.name.from_text(f"{selector}._domainkey.{domain}")
    except dns.exception.DNSException:
        return _Signature(index, domain, selector, algorithm, "bad d= or s=")
    try:
        body = _body_spec(tags)
    except Exception:
        # A bad c= or l=: dkimpy says so when the signature is verified (permerror).
        return _Signature(index, domain, selector, algorithm)
    return _Signature(index, domain, selector, algorithm, body=body)


def _verify_all(
    verifier: _Verifier, signatures: Sequence[_Signature], keys: dict[str, _KeyRecord]
) -> list[DkimSignatureResult]:
    return [_verify_one(verifier, s, keys.get(s.key_name)) for s in signatures]


def _verify_one(verifier: _Verifier, sig: _Signature, key: _KeyRecord) -> DkimSignatureResult:
    def result(value: DkimResult, reason: str = "") -> DkimSignatureResult:
        return DkimSignatureResult(sig.domain, sig.selector, value, reason, sig.algorithm)

    if sig.problem == _SKIPPED:
        # RFC 8601 section 2.7.1: "neutral", the signature could not be processed.
        return result("neutral", sig.problem)
    if sig.problem:
        return result("permerror", sig.problem)
    if isinstance(key, DnsTempError):
        return result("temperror", f"key lookup failed: {key}")
    if key is None:
        # RFC 6376 section 6.1.2 step 3: no key record is PERMFAIL (no key for signature).
        return result("permerror", f"no key at {sig.key_name}")
    try:
        _pk, _size, ktag, _tlsrpt = dkim.evaluate_pk(sig.key_name.encode(), key)
    except Exception as exc:
        return result("permerror", f"bad key record: {reason_text(exc)}")
    if not sig.algorithm.startswith(ktag.decode() + "-"):
        # RFC 6376 section 6.1.2 step 6: a key of another type is unusable.
        return result("permerror", f"k={ktag.decode()} key for a={sig.algorithm}")

    def served(name: bytes, timeout: float = 0.0) -> bytes:
        # The key was already fetched through our resolver; dkimpy only gets it served.
        if _text(name).rstrip(".").lower() != sig.key_name.lower():
            raise _KeyUnavailable(_text(name))
        return key

    try:
        valid = verifier.verify(idx=sig.index, dnsfunc=served)
    except _KeyUnavailable:
        return result("temperror", "key not available")
    except dkim.ValidationError as exc:
        # dkimpy reports a body hash mismatch this way: the body changed after signing.
        return result("fail", reason_text(exc))
    except Exception as exc:
        # KeyFormatError (key under 1024 bits, RFC 8301 section 3.2) and other format
        # problems: the signature cannot be evaluated.
        return result("permerror", reason_text(exc))
    if not valid:
        return result("fail", "signature does not verify")
    signed = [h.lower() for h in verifier.include_headers]
    if b"from" not in signed:
        # RFC 6376 section 6.1.1: h= must include From. The signature verifies, but it
        # does not cover the author, so it is reported as "policy" (valid, unacceptable).
        return result("policy", "h= does not include From")
    if sig.body is not None and sig.body.limit is not None:
        body_length = verifier.canonical_length(sig.body)
        signed_length = sig.body.limit
        if signed_length < body_length:
            # RFC 6376 section 8.2: content after l= is unsigned and may be anything.
            # The signed part verifies, so "policy" (not "neutral"): valid, unacceptable.
            return result("policy", f"l={signed_length} covers part of a {body_length}-octet body")
    return result("pass")


def _text(value: bytes) -> str:
    return value.decode("ascii", errors="replace")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# -- Signing ------------------------------------------------------------------------------

# Signed when present (and, for absent ones, guarding against their later addition,
# RFC 6376 section 5.4.2). From is always signed and is oversigned by sign().
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
)
# RFC 6376 section 5.4.1: fields that are routinely added or changed in transit.
NEVER_SIGNED = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key (PEM, PKCS#8 or PKCS#1) and where its public half is published."""

    domain: str
    selector: str
    algorithm: Algorithm
    private_key: bytes = field(repr=False)


# Every key signs relaxed/relaxed with SHA-256 (rsa-sha256 and ed25519-sha256 alike), no l=.
SIGNING_BODY = BodyHashSpec("relaxed", "sha256")


def sign(
    message: bytes, keys: Sequence[SigningKey], headers: Sequence[str],
    tail: Tail | None = None, body_hash: BodyHash | None = None,
) -> bytes:
    """DKIM-Signature header fields (folded, CRLF-terminated) to prepend to ``message``,
    one per key, e.g. RSA and Ed25519 side by side (RFC 8463 section 4). A large message
    is given as its in-memory part (with the whole header section) and its ``tail``,
    read in pieces for the body hash, never whole; or not at all with ``body_hash``
    (SIGNING_BODY's, e.g. from DkimOutcome.body_hashes).

    CPU-bound and reads the tail file: call it off the event loop. The message bytes
    are not changed.
    """
    include = [h.strip().lower() for h in headers if h.strip()]
    unsignable = sorted(set(include) & NEVER_SIGNED)
    if unsignable:
        raise ValueError(f"header fields that must not be signed: {', '.join(unsignable)}")
    include = [h for h in include if h != "from"]
    header_section, body_start = split_message(message, tail)
    # From first, and once more than it occurs: RFC 6376 section 8.15, an added second
    # From then breaks the signature.
    fields = dkim.rfc822_parse(header_section)[0]
    froms = sum(1 for name, _ in fields if name.lower() == b"from")
    include = ["from"] * (max(froms, 1) + 1) + include
    if body_hash is None:
        body_hash = hash_body([SIGNING_BODY], pieces(body_start, tail))[SIGNING_BODY]
    out = []
    for key in keys:
        signer = _Signer(header_section, body_hash.digest, key.algorithm.encode())
        out.append(
            signer.sign(
                key.selector.encode(),
                key.domain.encode(),
                _dkimpy_private_key(key),
                # relaxed/relaxed survives the whitespace changes of ordinary relays;
                # no l= (RFC 6376 section 8.2: it lets anyone append content).
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[h.encode() for h in include],
                length=False,
            )
        )
    return b"".join(out)


class _Signer(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type hints
    """dkimpy's signer given the header section alone, so DKIM.sign() hashes an empty
    body: the bh= it computed is replaced by the real body's hash (computed beforehand
    from the streamed body, relay/checks/bodyhash.py) on its way into gen_header, before
    the header is hashed and signed (dkimpy 1.1.8). Only without l=, which would give
    the empty body's length."""

    def __init__(self, header_section: bytes, body_hash: bytes, algorithm: bytes) -> None:
        super().__init__(header_section, signature_algorithm=algorithm, linesep=b"\r\n")
        self._bh = base64.b64encode(body_hash)

    def gen_header(self, fields: list[tuple[bytes, bytes]], *args: Any, **kwargs: Any) -> Any:
        fields = [(tag, self._bh if tag == b"bh" else value) for tag, value in fields]
        return super().gen_header(fields, *args, **kwargs)


def _dkimpy_private_key(key: SigningKey) -> bytes:
    """dkimpy wants PKCS#1 PEM for RSA and the base64 32-octet seed for Ed25519."""
    private = serialization.load_pem_private_key(key.private_key, password=None)
    if key.algorithm == "rsa-sha256" and isinstance(private, rsa.RSAPrivateKey):
        return private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    if key.algorithm == "ed25519-sha256" and isinstance(private, ed25519.Ed25519PrivateKey):
        seed = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(seed)
    raise ValueError(f"{key.domain}/{key.selector}: key does not match {key.algorithm}")


def load_key(path: Path | str, domain: str, selector: str) -> SigningKey:
    """Read a PEM private key file; the algorithm follows from the key type.

    Raises ValueError naming the file when the key is unreadable, encrypted, of another
    type, or an RSA key under 1024 bits (RFC 8301 section 3.2).
    """
    try:
        pem = Path(path).read_bytes()
        private = serialization.load_pem_private_key(pem, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: cannot load DKIM private key: {exc}") from exc
    algorithm: Algorithm
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 1024:
            raise ValueError(f"{path}: RSA key of {private.key_size} bits, 1024 at least")
        algorithm = "rsa-sha256"
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        algorithm = "ed25519-sha256"
    else:
        raise ValueError(f"{path}: DKIM keys are RSA or Ed25519, not {type(private).__name__}")
    return SigningKey(domain, selector, algorithm, pem)


def generate_key(kind: Literal["rsa", "ed25519"] = "rsa", bits: int = 2048) -> tuple[bytes, str]:
    """A new private key (PKCS#8 PEM) and the TXT value to publish at
    ``<selector>._domainkey.<domain>`` (RFC 6376 section 3.6.1, RFC 8463 section 4.2)."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, _txt_value(private)


def _txt_value(private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    if isinstance(private, rsa.RSAPrivateKey):
        # p= is the DER SubjectPublicKeyInfo, base64 (RFC 6376 section 3.6.1).
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    # RFC 8463 section 4.2: p= is the raw 32-octet public key, base64.
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


async def check_published_key(resolver: Resolver, key: SigningKey) -> tuple[bool, str]:
    """Whether DNS publishes the public half of ``key`` at its selector."""
    name = f"{key.selector}._domainkey.{key.domain}"
    private = serialization.load_pem_private_key(key.private_key, password=None)
    if not isinstance(private, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return False, f"{name}: unsupported private key type"
    expected = dkim.util.parse_tag_value(_txt_value(private).encode())
    try:
        records = await resolver.txt(name)
    except DnsTempError as exc:
        return False, f"{name}: DNS lookup failed: {exc}"
    if not records:
        return False, f"{name}: no TXT record published"
    for record in records:
        try:
            tags = dkim.util.parse_tag_value(record)
        except Exception:
            continue
        published = re.sub(rb"\s+", b"", tags.get(b"p", b""))
        if tags.get(b"k", b"rsa") == expected[b"k"] and published == expected[b"p"]:
            return True, f"{name}: public key matches"
        if not published and b"p" in tags:
            return False, f"{name}: key revoked (empty p=)"
    return False, f"{name}: published key does not match the private key"
