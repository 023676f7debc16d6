"""A node's keys, kept in the data directory.

- ``identity/p2p-ed25519.key``: the libp2p Ed25519 key (its 32-byte seed), mode
  0600. It is the node's peer id, stable across restarts.
- ``identity/eth-keystore.json``: the Ethereum account that pays or is paid, as
  an eth-account (Web3 Secret Storage, scrypt) keystore. Its passphrase comes from
  ``$LLMARKET_PASSPHRASE`` or a prompt.
- ``identity/eth-dev.key``: with ``--insecure-dev-key`` only, a plaintext key,
  refused on any chain but a local dev chain.

The **binding** ties the two: the Ethereum key signs (EIP-191) the text
``llmarket peer <peer id>``, so anyone who sees an offer can check which
address that peer is paid at, and nobody can advertise someone else's address.
"""

from __future__ import annotations

import getpass
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import multihash
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from node.errors import IdentityError

ENV_PASSPHRASE = "LLMARKET_PASSPHRASE"
DEV_CHAINS = (31337, 1337)
_P2P_KEY = "p2p-ed25519.key"
_KEYSTORE = "eth-keystore.json"
_DEV_KEY = "eth-dev.key"


def _identity_dir(data_dir: Path) -> Path:
    path = Path(data_dir) / "identity"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never briefly readable by others); refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read_private(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    return path.read_bytes()


def load_or_create_p2p_key(data_dir: Path) -> KeyPair:
    """The node's libp2p key pair, created on first use."""
    path = _identity_dir(data_dir) / _P2P_KEY
    if not path.exists():
        _write_private(path, Ed25519PrivateKey.new().to_bytes())
    seed = _read_private(path)
    if len(seed) != 32:
        raise IdentityError(f"{path} is not a 32-byte Ed25519 seed; move it away to make a new identity")
    private = Ed25519PrivateKey.from_bytes(seed)
    return KeyPair(private, private.get_public_key())


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


def _passphrase(prompt: str, *, confirm: bool) -> str:
    if os.environ.get(ENV_PASSPHRASE):
        return os.environ[ENV_PASSPHRASE]
    if not sys.stdin.isatty():
        raise IdentityError(f"the wallet needs a passphrase: set ${ENV_PASSPHRASE} (no terminal to ask on)")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != first:
        raise IdentityError("the two passphrases differ")
    if not first:
        raise IdentityError("an empty passphrase is not allowed")
    return first


def load_or_create_account(
    data_dir: Path, *, insecure_dev_key: bool = False, chain_id: int | None = None
) -> LocalAccount:
    """The node's Ethereum account, created on first use.

    Raises:
        IdentityError: a dev key outside a dev chain, a wrong passphrase, an unreadable keystore.
    """
    directory = _identity_dir(data_dir)
    if insecure_dev_key:
        if chain_id not in DEV_CHAINS:
            raise IdentityError(
                f"--insecure-dev-key keeps the key unencrypted and is only for local dev chains {DEV_CHAINS}, "
                f"not chain {chain_id}; drop the flag to use an encrypted keystore"
            )
        path = directory / _DEV_KEY
        if not path.exists():
            _write_private(path, Account.create().key.hex().encode())
        return Account.from_key(_read_private(path).decode().strip())
    path = directory / _KEYSTORE
    if not path.exists():
        passphrase = _passphrase("new wallet passphrase: ", confirm=True)
        account = Account.create()
        _write_private(path, json.dumps(Account.encrypt(account.key, passphrase)).encode())
        return account
    try:
        keystore = json.loads(_read_private(path))
    except json.JSONDecodeError as err:
        raise IdentityError(f"{path} is not a keystore ({err}); restore it from your backup") from None
    try:
        return Account.from_key(Account.decrypt(keystore, _passphrase("wallet passphrase: ", confirm=False)))
    except ValueError:
        raise IdentityError(f"wrong passphrase for {path}") from None


def binding_text(peer_id: str) -> str:
    return f"llmarket peer {peer_id}"


def sign_binding(account: LocalAccount, peer_id: str) -> bytes:
    """The account's EIP-191 signature binding it to ``peer_id``."""
    return bytes(account.sign_message(encode_defunct(text=binding_text(peer_id))).signature)


def verify_binding(peer_id: str, payee: str, signature: bytes) -> bool:
    """Whether ``payee`` signed the binding to ``peer_id``."""
    try:
        signer = Account.recover_message(encode_defunct(text=binding_text(peer_id)), signature=signature)
    except Exception:  # malformed signatures raise several types
        return False
    return signer.lower() == payee.lower()


@dataclass(frozen=True)
class Identity:
    """Everything a node signs with."""

    key_pair: KeyPair
    peer_id: str
    account: LocalAccount | None
    binding: bytes  # b"" without an account

    @classmethod
    def load(cls, data_dir: Path, *, account: LocalAccount | None = None) -> Identity:
        key_pair = load_or_create_p2p_key(data_dir)
        peer_id = peer_id_of(key_pair)
        return cls(key_pair, peer_id, account, sign_binding(account, peer_id) if account else b"")

    @property
    def payee(self) -> str:
        return self.account.address if self.account else ""

    def sign(self, data: bytes) -> bytes:
        """Sign with the libp2p key (offers, result receipts)."""
        return self.key_pair.private_key.sign(data)


def verify_peer_signature(peer_id: str, data: bytes, signature: bytes) -> bool:
    """Whether the libp2p key behind ``peer_id`` signed ``data`` (Ed25519 peer ids embed their key)."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
        return key is not None and key.verify(data, signature)
    except Exception:  # bad base58, bad key encodings, bad signature lengths
        return False


def valid_peer_id(text: str) -> bool:
    """Whether ``text`` is a base58 peer id (a multihash; any base58 text would decode to bytes)."""
    try:
        raw = ID.from_base58(text).to_bytes()
        multihash.decode(raw)
    except Exception:  # base58 and multihash raise several types
        return False
    return 2 < len(raw) <= 64 and ID(raw).to_base58() == text
