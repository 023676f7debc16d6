"""Keys in the data dir: stable, private, and bound to each other."""

from __future__ import annotations

import os
import stat

import pytest

from node.errors import IdentityError
from node.net.identity import (
    Identity,
    load_or_create_account,
    load_or_create_p2p_key,
    peer_id_of,
    sign_binding,
    verify_binding,
    verify_peer_signature,
)


def test_p2p_key_is_created_private_and_stable(tmp_path):
    first = peer_id_of(load_or_create_p2p_key(tmp_path))
    key_file = tmp_path / "identity" / "p2p-ed25519.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert peer_id_of(load_or_create_p2p_key(tmp_path)) == first
    os.chmod(key_file, 0o644)
    with pytest.raises(IdentityError, match=r"readable by others \(mode 644\); run `chmod 600 "):
        load_or_create_p2p_key(tmp_path)


def test_keystore_needs_the_passphrase(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMARKET_PASSPHRASE", "correct horse")
    account = load_or_create_account(tmp_path)
    assert stat.S_IMODE((tmp_path / "identity" / "eth-keystore.json").stat().st_mode) == 0o600
    assert load_or_create_account(tmp_path).address == account.address
    monkeypatch.setenv("LLMARKET_PASSPHRASE", "wrong")
    with pytest.raises(IdentityError, match="wrong passphrase"):
        load_or_create_account(tmp_path)
    monkeypatch.delenv("LLMARKET_PASSPHRASE")
    with pytest.raises(IdentityError, match=r"set \$LLMARKET_PASSPHRASE"):
        load_or_create_account(tmp_path)


def test_dev_keys_only_on_dev_chains(tmp_path):
    account = load_or_create_account(tmp_path, insecure_dev_key=True, chain_id=31337)
    assert load_or_create_account(tmp_path, insecure_dev_key=True, chain_id=1337).address == account.address
    with pytest.raises(IdentityError, match="only for local dev chains"):
        load_or_create_account(tmp_path, insecure_dev_key=True, chain_id=11155111)


def test_binding_and_peer_signatures(tmp_path):
    account = load_or_create_account(tmp_path, insecure_dev_key=True, chain_id=31337)
    me = Identity.load(tmp_path, account=account)
    assert verify_binding(me.peer_id, me.payee, me.binding)
    other = Identity.load(tmp_path / "other")
    assert not verify_binding(other.peer_id, me.payee, me.binding)  # my binding, someone else's peer id
    assert not verify_binding(me.peer_id, me.payee, b"\0" * 65)
    assert verify_binding(other.peer_id, me.payee, sign_binding(account, other.peer_id))
    assert verify_peer_signature(me.peer_id, b"data", me.sign(b"data"))
    assert not verify_peer_signature(other.peer_id, b"data", me.sign(b"data"))
    assert not verify_peer_signature("not-a-peer-id", b"data", me.sign(b"data"))
