"""The TLS and SVID options of `pywg coordinator serve` and `pywg agent up`: a bad
combination or file is one line naming the option (exit 2), nothing started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.spiffe_ca import LocalCA, write_bundle

PYWG = str(Path(sys.executable).parent / "pywg")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = LocalCA()
    cert, key = ca.write_leaf(tmp, "server", ips=["127.0.0.1"], server=True)
    svid, svid_key = ca.write_leaf(tmp, "svid", uris=["spiffe://example.org/a"])
    (tmp / "junk.pem").write_text("junk\n")
    return {"cert": str(cert), "key": str(key), "svid": str(svid), "svid_key": str(svid_key),
            "bundle": str(write_bundle(tmp / "bundle.pem", ca)), "junk": str(tmp / "junk.pem"),
            "db": f"sqlite:{tmp / 'c.db'}"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYWG, *args], capture_output=True, text=True, check=False, timeout=30)


@pytest.mark.parametrize(("extra", "named"), [
    (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
    (["--client-ca", "{bundle}", "--trust-domain", "example.org"], "--client-ca needs --tls-cert"),
    (["--tls-cert", "{cert}", "--tls-key", "{key}", "--client-ca", "{bundle}"],
     "--client-ca and --trust-domain go together"),
    (["--tls-cert", "{cert}", "--tls-key", "{key}", "--client-ca", "{bundle}", "--trust-domain", "Bad/Domain"],
     "--trust-domain: 'Bad/Domain' is not a trust domain name"),
    (["--tls-cert", "{cert}", "--tls-key", "{svid_key}"], "--tls-cert/--tls-key: "),
    (["--tls-cert", "{junk}", "--tls-key", "{key}"], "--tls-cert/--tls-key: "),
    (["--tls-cert", "{cert}", "--tls-key", "{key}", "--client-ca", "{junk}", "--trust-domain", "example.org"],
     "--client-ca: "),
])
def test_serve_names_the_bad_tls_option(files: dict[str, str], extra: list[str], named: str) -> None:
    out = run("coordinator", "serve", "--listen", "127.0.0.1:0", "--store", files["db"],
              *(e.format(**files) for e in extra))
    assert out.returncode == 2, out
    assert named in out.stderr and "Traceback" not in out.stderr
    assert "listening" not in out.stdout


@pytest.mark.parametrize(("extra", "named"), [
    (["--coordinator", "https://127.0.0.1:1", "--svid", "{svid}", "--trust-bundle", "{bundle}"],
     "--svid and --svid-key go together"),
    (["--coordinator", "http://127.0.0.1:1", "--svid", "{svid}", "--svid-key", "{svid_key}",
      "--trust-bundle", "{bundle}"], "--svid: an X.509-SVID is presented over TLS"),
    (["--coordinator", "https://127.0.0.1:1", "--svid", "{svid}", "--svid-key", "{svid_key}"],
     "--svid: give --trust-bundle"),
    (["--coordinator", "https://127.0.0.1:1", "--svid", "{svid}", "--svid-key", "{svid_key}",
      "--trust-bundle", "{junk}"], "--trust-bundle: "),
    (["--coordinator", "https://127.0.0.1:1", "--svid", "{svid}", "--svid-key", "{key}",
      "--trust-bundle", "{bundle}"], "--svid/--svid-key: "),
    (["--coordinator", "https://127.0.0.1:1", "--svid", "{svid}", "--svid-key", "{svid_key}",
      "--authkey-file", "-"], "not allowed with argument"),
])
def test_agent_up_names_the_bad_svid_option(files: dict[str, str], extra: list[str], named: str) -> None:
    out = run("agent", "up", "--state-dir", "/nonexistent/state", *(e.format(**files) for e in extra))
    assert out.returncode == 2, out
    assert named in out.stderr and "Traceback" not in out.stderr
