"""Plugins: L1 providers (local keyring, PKCS#11 on SoftHSM2) and vault stores (RocksDB, fs).

Real crypto, real RocksDB, real SoftHSM2; nothing is mocked.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugins.crypto import KeyHandle, UnwrapError, keyring_loads
from plugins.l1 import L1Refused, l2_aad, open_l1
from plugins.l1_local import LocalL1, add_key, create_keyring, keyring_info, set_regions
from plugins.vault import Vault, open_vault
from plugins.vault_fs import FsVault
from plugins.vault_rocksdb import RocksVault

ROOT = Path(__file__).resolve().parent.parent
EU = "eu-central-1"
US = "us-east-1"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def aad(tenant: str = "acme", ref: str = "default", key_id: str = "e1v1") -> bytes:
    return l2_aad(tenant, ref, key_id)


def needles(secret: bytes) -> list[bytes]:
    """Every encoding of `secret` a leak could plausibly take."""
    return [
        secret,
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        secret.hex().encode(),
    ]


def leaks(text: str, secret: bytes) -> bool:
    data = text.encode("utf-8", "surrogateescape")
    return any(n in data for n in needles(secret))


def files_containing(directory: Path, secret: bytes) -> list[str]:
    hits = []
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(n in data for n in needles(secret)):
                hits.append(str(path.relative_to(directory)))
    return hits


def keyring_secrets(path: Path) -> list[bytes]:
    doc = json.loads(path.read_bytes())
    return [base64.b64decode(v) for v in doc["keys"].values()]


# --- local L1 ------------------------------------------------------------------------------


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    return tmp_path / "l1" / "keyring.json"


def test_local_created_on_first_use_private_with_default_key(keyring: Path) -> None:
    provider = open_l1(f"local:{keyring}", EU)
    assert isinstance(provider, LocalL1)
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
    doc = json.loads(keyring.read_bytes())
    assert doc["version"] == 1 and doc["regions"] is None and list(doc["keys"]) == ["default"]
    assert len(base64.b64decode(doc["keys"]["default"])) == 32
    assert provider.default_ref("acme") == "default"
    assert provider.allows_region(EU) and provider.allows_region(US)
    assert [p.name for p in keyring.parent.iterdir()] == ["keyring.json"]  # no temp left


def test_local_wrap_unwrap_round_trip(keyring: Path) -> None:
    provider = LocalL1.open(str(keyring), EU)
    l2 = KeyHandle.generate()
    blob = provider.wrap("default", l2, aad())
    assert len(blob) == 1 + 12 + 32 + 16 and blob[0] == 0x01
    back = provider.unwrap("default", blob, aad())
    assert back.kcv == l2.kcv
    assert provider.wrap("default", l2, aad()) != blob  # fresh nonce each time
    # a second provider (another region's Core) on the same keyring unwraps it too
    assert LocalL1.open(str(keyring), "eu-west-1").unwrap("default", blob, aad()).kcv == l2.kcv


@pytest.mark.parametrize(
    "other",
    [
        aad(tenant="acme2"),
        aad(key_id="e1v2"),
        aad(key_id="e2v1"),
        aad(ref="customer-7"),
        b"",
    ],
    ids=["tenant", "version", "epoch", "l1-ref", "empty"],
)
def test_local_aad_mismatch_fails(keyring: Path, other: bytes) -> None:
    provider = LocalL1.open(str(keyring), EU)
    blob = provider.wrap("default", KeyHandle.generate(), aad())
    with pytest.raises(UnwrapError):
        provider.unwrap("default", blob, other)


def test_local_tampering_fails(keyring: Path) -> None:
    provider = LocalL1.open(str(keyring), EU)
    blob = provider.wrap("default", KeyHandle.generate(), aad())
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(UnwrapError):
            provider.unwrap("default", bytes(bad), aad())
    for cut in (blob[:-1], blob[:20], b""):
        with pytest.raises(UnwrapError):
            provider.unwrap("default", cut, aad())


def test_local_blob_is_bound_to_its_l1_key(keyring: Path) -> None:
    provider = LocalL1.open(str(keyring), EU)
    add_key(keyring, "customer-7")
    blob = provider.wrap("default", KeyHandle.generate(), aad())
    with pytest.raises(UnwrapError):
        provider.unwrap("customer-7", blob, aad())


def test_local_region_refusal_and_regions_change(keyring: Path) -> None:
    assert create_keyring(keyring, [EU, "eu-west-1"]) is True
    us = LocalL1.open(str(keyring), US)
    eu = LocalL1.open(str(keyring), EU)
    assert not us.allows_region(US) and us.allows_region(EU)
    l2 = KeyHandle.generate()
    blob = eu.wrap("default", l2, aad())
    with pytest.raises(L1Refused, match="does not serve region 'us-east-1'"):
        us.wrap("default", l2, aad())
    with pytest.raises(L1Refused, match="does not serve region"):
        us.unwrap("default", blob, aad())
    assert us.health()["ok"] is False
    set_regions(keyring, None)  # the customer opens the keyring to every region
    assert us.unwrap("default", blob, aad()).kcv == l2.kcv
    set_regions(keyring, [US])  # ... and later withdraws EU
    with pytest.raises(L1Refused, match="does not serve region 'eu-central-1'"):
        eu.unwrap("default", blob, aad())


def test_local_unknown_and_malformed_refs_refused(keyring: Path) -> None:
    provider = LocalL1.open(str(keyring), EU)
    with pytest.raises(L1Refused, match="no key 'customer-9'"):
        provider.wrap("customer-9", KeyHandle.generate(), aad())
    with pytest.raises(L1Refused, match="no key"):
        provider.unwrap("customer-9", b"\x01" + b"\0" * 60, aad())
    for bad in ("", "../x", "a b", "x" * 65):
        with pytest.raises(L1Refused, match="malformed L1 reference"):
            provider.wrap(bad, KeyHandle.generate(), aad())


def test_local_add_key_seen_by_running_provider(keyring: Path) -> None:
    provider = LocalL1.open(str(keyring), EU)
    assert add_key(keyring, "customer-7") == "customer-7"
    l2 = KeyHandle.generate()
    blob = provider.wrap("customer-7", l2, aad(ref="customer-7"))
    assert provider.unwrap("customer-7", blob, aad(ref="customer-7")).kcv == l2.kcv
    with pytest.raises(FileExistsError):
        add_key(keyring, "customer-7")
    before = keyring.read_bytes()
    assert add_key(keyring, "customer-7", exist_ok=True) == "customer-7"
    assert keyring.read_bytes() == before  # the existing key was kept
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
    info = keyring_info(keyring)
    assert sorted(info["keys"]) == ["customer-7", "default"]
    dumped = json.dumps(info) + json.dumps(provider.health()) + repr(provider)
    for secret in keyring_secrets(keyring):
        assert not leaks(dumped, secret)


def test_local_missing_or_malformed_keyring_refused(keyring: Path) -> None:
    provider = LocalL1.open(str(keyring), EU)
    blob = provider.wrap("default", KeyHandle.generate(), aad())
    keyring.write_text('{"version": 1, "regions": null, "keys": {"default": "AAAA"}}')
    with pytest.raises(L1Refused, match="malformed"):
        provider.unwrap("default", blob, aad())
    keyring.unlink()
    with pytest.raises(L1Refused, match="unreadable"):
        provider.unwrap("default", blob, aad())
    assert provider.health()["ok"] is False
    assert not keyring.exists()  # a lost keyring is never silently replaced


_RACER = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
from plugins.crypto import KeyHandle
from plugins.l1_local import LocalL1
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.0005)
provider = LocalL1.open(sys.argv[1], "eu-central-1")
key = KeyHandle.generate()
print(provider.wrap("default", key, b"race").hex(), key.kcv, flush=True)
"""


def test_local_concurrent_creation_yields_one_keyring(keyring: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(keyring), str(go), str(ROOT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0
        blob_hex, kcv = out.split()
        results.append((bytes.fromhex(blob_hex), kcv))
    # every process wrapped under the same default key: one provider unwraps all of them
    provider = LocalL1.open(str(keyring), EU)
    assert [provider.unwrap("default", b, b"race").kcv for b, _ in results] == [
        k for _, k in results
    ]
    assert len(keyring_secrets(keyring)) == 1
    assert sorted(p.name for p in keyring.parent.iterdir()) == ["keyring.json"]


# --- key handles ---------------------------------------------------------------------------


def test_key_handle_never_reveals_bytes(keyring: Path) -> None:
    LocalL1.open(str(keyring), EU)
    (secret,) = keyring_secrets(keyring)
    parsed = keyring_loads(keyring.read_bytes())
    handle = parsed.keys["default"]
    shown = repr(handle) + str(handle) + repr(parsed) + f"{handle}"
    assert not leaks(shown, secret)
    assert handle.kcv in repr(handle)
    with pytest.raises(TypeError):
        pickle.dumps(handle)
    with pytest.raises(TypeError):
        pickle.dumps(parsed)
    with pytest.raises(TypeError):
        copy.deepcopy(handle)
    assert not hasattr(handle, "__dict__")
    handle.destroy()
    assert handle.destroyed and repr(handle) == "<KeyHandle destroyed>"
    with pytest.raises(ValueError, match="destroyed"):
        handle.seal(b"x", b"")


def test_l2_aad_binds_each_field_unambiguously() -> None:
    base = l2_aad("acme", "default", "e1v1")
    variants = {
        l2_aad("acme2", "default", "e1v1"),
        l2_aad("acme", "customer-7", "e1v1"),
        l2_aad("acme", "default", "e1v2"),
        l2_aad("acm", "edefault", "e1v1"),
    }
    assert base not in variants and len(variants) == 4
    for bad in (("", "default", "e1v1"), ("a\0b", "default", "e1v1"), ("acme", "default", "")):
        with pytest.raises(ValueError):
            l2_aad(*bad)


# --- vaults ----------------------------------------------------------------------------------


@pytest.fixture(params=["rocksdb", "fs"])
def vault_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    yield request.param, tmp_path / f"vault-{request.param}"


def _open(kind: str, path: Path) -> Vault:
    return open_vault(f"{kind}:{path}", path.parent / "unused")


def test_vault_put_get_list_put_many_reopen(vault_dir: tuple[str, Path]) -> None:
    kind, path = vault_dir
    vault = _open(kind, path)
    assert isinstance(vault, RocksVault if kind == "rocksdb" else FsVault)
    a, b, c = os.urandom(61), os.urandom(60), os.urandom(60)
    vault.put("acme", "L2", "e1v1", a)
    vault.put_many(
        [("acme", "L3", "e1v1", b), ("acme", "L3", "e1v2", c), ("acme10", "L2", "e1v1", a)]
    )
    vault.put_many([])
    assert vault.get("acme", "L2", "e1v1") == a
    assert vault.get("acme", "L3", "e1v2") == c
    assert vault.get("acme", "L3", "e9v9") is None
    assert vault.get("nobody", "L2", "e1v1") is None
    assert vault.list("acme") == [("L2", "e1v1"), ("L3", "e1v1"), ("L3", "e1v2")]
    assert vault.list("acme1") == []
    vault.put("acme", "L3", "e1v2", b)  # overwrite
    vault.put_many([("acme", "L2", "e1v9", a), ("acme", "L2", "e1v9", c)])  # last one wins
    assert vault.get("acme", "L2", "e1v9") == c
    vault.close()
    vault = _open(kind, path)
    assert vault.get("acme", "L3", "e1v2") == b and vault.list("acme10") == [("L2", "e1v1")]
    assert len(vault.list("acme")) == 4
    for bad in (("../x", "L2", "e1v1"), ("acme", "L4", "e1v1"), ("acme", "L2", "../../e")):
        with pytest.raises(ValueError):
            vault.put(*bad, a)
    vault.close()


def test_vault_destroy_leaves_no_copy_on_disk(vault_dir: tuple[str, Path]) -> None:
    kind, path = vault_dir
    vault = _open(kind, path)
    doomed = [os.urandom(61) for _ in range(4)]
    kept = os.urandom(61)
    # spread the tenant over an SST (closed db), the WAL and the memtable (open db)
    vault.put_many([("acme", "L2", "e1v1", doomed[0]), ("acme", "L3", "e1v1", doomed[1])])
    vault.put("acme1", "L2", "e1v1", kept)
    vault.close()
    vault = _open(kind, path)
    vault.put("acme", "L3", "e1v2", doomed[2])
    vault.put("acme", "L2", "e1v2", doomed[3])
    assert files_containing(path, doomed[0]) and files_containing(path, doomed[3])
    assert vault.destroy_tenant("acme") == 4
    assert vault.list("acme") == [] and vault.get("acme", "L2", "e1v1") is None
    for secret in doomed:
        assert files_containing(path, secret) == []
    assert vault.get("acme1", "L2", "e1v1") == kept  # a neighbour's prefix is untouched
    assert vault.destroy_tenant("acme") == 0
    vault.close()
    for secret in doomed:  # and after close (final flush) too
        assert files_containing(path, secret) == []
    assert _open(kind, path).get("acme1", "L2", "e1v1") == kept


def test_fs_vault_layout_modes_and_no_temp_files(tmp_path: Path) -> None:
    vault = FsVault(tmp_path / "v")
    vault.put("acme", "L2", "e1v1", b"blob")
    f = tmp_path / "v" / "acme" / "L2" / "e1v1"
    assert f.read_bytes() == b"blob" and stat.S_IMODE(f.stat().st_mode) == 0o600
    assert [p.name for p in f.parent.iterdir()] == ["e1v1"]
    (f.parent / ".e1v1.1.1.tmp").write_bytes(b"stray")  # a crash between write and rename
    assert vault.list("acme") == [("L2", "e1v1")]
    assert vault.destroy_tenant("acme") == 1
    assert not (tmp_path / "v" / "acme").exists()


# --- PKCS#11 on SoftHSM2 -------------------------------------------------------------------


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private SoftHSM2 token; the URI (with PIN) to reach it. SoftHSM reads SOFTHSM2_CONF
    once per process, so every PKCS#11 test shares this token (each uses its own labels)."""
    if shutil.which("softhsm2-util") is None or not Path(SOFTHSM_MODULE).exists():
        pytest.skip("SoftHSM2 is not installed (run .ci/install-softhsm)")
    pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed (extra 'pkcs11')")
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in ("openkcm", "race"):
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label]
            + ["--pin", "1234", "--so-pin", "5678"],
            check=True,
            capture_output=True,
        )
    yield f"pkcs11:module={SOFTHSM_MODULE};token=openkcm;pin=1234"
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


def test_pkcs11_round_trip_and_non_extractable_key(softhsm: str) -> None:
    from pkcs11 import Attribute

    from plugins.l1_pkcs11 import Pkcs11L1, _find

    provider = open_l1(softhsm, EU)
    assert isinstance(provider, Pkcs11L1) and provider.default_ref("acme") == "default"
    l2 = KeyHandle.generate()
    blob = provider.wrap("default", l2, aad())
    assert len(blob) == 61 and blob[0] == 0x02
    assert provider.unwrap("default", blob, aad()).kcv == l2.kcv
    shared = provider._session()
    (root,) = _find(shared.session, "default")  # exactly one default key, generated inside
    assert root[0][Attribute.EXTRACTABLE] is False and root[0][Attribute.SENSITIVE] is True
    health = provider.health()
    assert health["ok"] is True and "1234" not in json.dumps(health) + repr(provider.cfg)
    provider.close()


def test_pkcs11_aad_mismatch_tampering_and_foreign_blob(softhsm: str, keyring: Path) -> None:
    provider = open_l1(softhsm, EU)
    blob = provider.wrap("default", KeyHandle.generate(), aad())
    for other in (aad(tenant="acme2"), aad(key_id="e1v2"), aad(ref="customer-7")):
        with pytest.raises(UnwrapError):
            provider.unwrap("default", blob, other)
    for i in (0, 5, 20, 40, 60):
        bad = bytearray(blob)
        bad[i] ^= 0x80
        with pytest.raises(UnwrapError):
            provider.unwrap("default", bytes(bad), aad())
    local_blob = LocalL1.open(str(keyring), EU).wrap("default", KeyHandle.generate(), aad())
    with pytest.raises(UnwrapError):
        provider.unwrap("default", local_blob, aad())
    # the session survives failed decryptions
    l2 = KeyHandle.generate()
    assert provider.unwrap("default", provider.wrap("default", l2, aad()), aad()).kcv == l2.kcv


def test_pkcs11_survivor_region_unwraps(softhsm: str) -> None:
    from plugins.l1_pkcs11 import add_key as hsm_add_key

    assert hsm_add_key(softhsm, "customer-7") == "customer-7"
    primary = open_l1(f"{softhsm};regions={EU}", EU)
    l2 = KeyHandle.generate()
    blob = primary.wrap("customer-7", l2, aad(ref="customer-7"))
    # a second instance for another region, in this process ...
    survivor = open_l1(f"{softhsm};regions={EU},eu-west-1", "eu-west-1")
    assert survivor.unwrap("customer-7", blob, aad(ref="customer-7")).kcv == l2.kcv
    # ... and in a process of its own, with the PIN from the environment
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from plugins.l1 import open_l1, l2_aad;"
        "p = open_l1(sys.argv[2], 'eu-west-1');"
        "print(p.unwrap('customer-7', bytes.fromhex(sys.argv[3]),"
        " l2_aad('acme', 'customer-7', 'e1v1')).kcv)"
    )
    env = {**os.environ, "OPENKCM_PKCS11_PIN": "1234"}
    uri = f"pkcs11:module={SOFTHSM_MODULE};token=openkcm"
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), uri, blob.hex()],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == l2.kcv


def test_pkcs11_refusals(softhsm: str) -> None:
    from plugins.l1_pkcs11 import add_key as hsm_add_key

    provider = open_l1(f"{softhsm};regions={EU}", US)
    assert not provider.allows_region(US) and provider.allows_region(EU)
    with pytest.raises(L1Refused, match="does not serve region 'us-east-1'"):
        provider.wrap("default", KeyHandle.generate(), aad())
    eu = open_l1(softhsm, EU)
    with pytest.raises(L1Refused, match="no key 'customer-404'"):
        eu.wrap("customer-404", KeyHandle.generate(), aad())
    with pytest.raises(FileExistsError):
        hsm_add_key(softhsm, "default")
    with pytest.raises(L1Refused) as refused:
        open_l1(softhsm.replace("pin=1234", "pin=9999"), EU)
    assert "9999" not in str(refused.value) and "1234" not in str(refused.value)
    with pytest.raises(ValueError, match="token"):
        open_l1(f"pkcs11:module={SOFTHSM_MODULE};pin=1234", EU)
    with pytest.raises(ValueError, match="regions= is empty"):
        open_l1(f"{softhsm};regions=", EU)


_HSM_RACER = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
from plugins.crypto import KeyHandle
from plugins.l1 import open_l1
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.0005)
provider = open_l1(sys.argv[1], "eu-central-1")
key = KeyHandle.generate()
print(provider.wrap("default", key, b"race").hex(), key.kcv, flush=True)
"""


def test_pkcs11_concurrent_starts_make_one_default_key(softhsm: str, tmp_path: Path) -> None:
    from plugins.l1_pkcs11 import _find

    uri = softhsm.replace("token=openkcm", "token=race")  # a token nobody has opened yet
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HSM_RACER, uri, str(go), str(ROOT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0
        blob_hex, kcv = out.split()
        results.append((bytes.fromhex(blob_hex), kcv))
    provider = open_l1(uri, EU)
    assert len(_find(provider._session().session, "default")) == 1
    assert [provider.unwrap("default", b, b"race").kcv for b, _ in results] == [
        k for _, k in results
    ]


def test_open_l1_unknown_scheme_rejected() -> None:
    with pytest.raises(ValueError, match="unknown L1 provider"):
        open_l1("vault:whatever", EU)
    with pytest.raises(ValueError, match="unknown vault"):
        open_vault("s3:bucket", Path("/nonexistent"))


def test_keyring_timestamp_granularity_reload(keyring: Path) -> None:
    """Two changes within one clock tick are both seen (the reload keys on the inode too)."""
    provider = LocalL1.open(str(keyring), EU)
    provider.wrap("default", KeyHandle.generate(), aad())
    t0 = time.monotonic()
    add_key(keyring, "k1")
    add_key(keyring, "k2")
    assert provider.wrap("k2", KeyHandle.generate(), aad(ref="k2"))[0] == 0x01
    assert time.monotonic() - t0 < 5
