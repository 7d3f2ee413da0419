"""bpf/ctrace.h and ctrace/abi.py describe the same bytes: compile the header and compare."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ctrace import abi

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "ctrace.h"

ENUMS = {
    "CT_KIND_": abi.Kind,
    "CT_DESTROY_": abi.DestroyReason,
    "CT_DROP_": abi.DropReason,
    "CT_LOST_": abi.LostCause,
    "CT_COUNTER_": abi.Counter,
    "CT_TCP_": abi.TcpState,
}


def _header_constants() -> list:
    """Every enumerator and #define constant the header declares, by name."""
    text = HEADER.read_text()
    names = re.findall(r"^\s*(CT_[A-Z0-9_]+)\s*=", text, re.M)
    names += re.findall(r"^#define\s+(CT_[A-Z0-9_]+)\s+\S", text, re.M)
    return [n for n in names if n != "CTRACE_H"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed to check the ABI (apt-get install gcc)")
    fields = abi.EVENT_DTYPE.names
    lines = [
        f'#include "{HEADER}"',
        "#include <stdio.h>",
        "#include <stddef.h>",
        "int main(void) {",
        '  printf("{\\"size\\": %zu, \\"fields\\": {", sizeof(struct ct_event));',
    ]
    for i, name in enumerate(fields):
        sep = "," if i else ""
        lines.append(
            f'  printf("{sep}\\"{name}\\": [%zu, %zu]", offsetof(struct ct_event, {name}),'
            f" sizeof(((struct ct_event *)0)->{name}));"
        )
    lines.append('  printf("}, \\"consts\\": {");')
    for i, name in enumerate(_header_constants()):
        sep = "," if i else ""
        lines.append(f'  printf("{sep}\\"{name}\\": %lld", (long long)({name}));')
    lines += ['  printf("}}");', "  return 0;", "}"]
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "abi.c", d / "abi"
    src.write_text("\n".join(lines))
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    return json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)


def test_record_size(compiled):
    assert compiled["size"] == abi.EVENT_SIZE == abi.EVENT_DTYPE.itemsize


def test_every_field_offset_and_size(compiled):
    c_fields = compiled["fields"]
    assert set(c_fields) == set(abi.EVENT_DTYPE.names)
    for name in abi.EVENT_DTYPE.names:
        dt, off = abi.EVENT_DTYPE.fields[name][:2]
        assert c_fields[name] == [off, dt.itemsize], name


def test_no_gaps_between_fields():
    spans = sorted((abi.EVENT_DTYPE.fields[n][1], abi.EVENT_DTYPE.fields[n][0].itemsize) for n in abi.EVENT_DTYPE.names)
    pos = 0
    for off, size in spans:
        assert off == pos
        pos += size
    assert pos == abi.EVENT_SIZE


def test_every_enum_matches(compiled):
    consts = compiled["consts"]
    for prefix, enum in ENUMS.items():
        in_c = {k[len(prefix):]: v for k, v in consts.items() if k.startswith(prefix)}
        assert in_c == {m.name: m.value for m in enum}, prefix


def test_defines_match(compiled):
    consts = compiled["consts"]
    assert consts["CT_ABI_MAJOR"] == abi.ABI_MAJOR
    assert consts["CT_ABI_MINOR"] == abi.ABI_MINOR
    assert consts["CT_FLAG_START_KNOWN"] == abi.FLAG_START_KNOWN
    assert consts["CT_FLAG_SYNTHETIC"] == abi.FLAG_SYNTHETIC
    assert consts["CT_FLAG_ORPHANED"] == abi.FLAG_ORPHANED
    assert consts["CT_FLAG_DUMP_ID"] == abi.FLAG_DUMP_ID
    assert consts["CT_IPS_SEEN_REPLY"] == abi.IPS_SEEN_REPLY
    assert consts["CT_IPS_ASSURED"] == abi.IPS_ASSURED
    assert consts["CT_IPS_CONFIRMED"] == abi.IPS_CONFIRMED


def test_ports_decode_to_host_order():
    a = abi.empty(1)
    a["orig_dport_be"] = 443
    assert a.tobytes()[abi.FIELD_OFFSETS["orig_dport_be"]:][:2] == b"\x01\xbb"


def test_decode_accepts_wider_records():
    a = abi.empty(2)
    a["ct_id"] = [7, 9]
    a["orig_sport_be"] = [1, 2]
    wide = b"".join(r.tobytes() + b"\xff" * 8 for r in a)
    back = abi.decode(wide, abi.EVENT_SIZE + 8)
    assert list(back["ct_id"]) == [7, 9] and list(back["orig_sport_be"]) == [1, 2]


def test_decode_refuses_narrower_records():
    with pytest.raises(ValueError):
        abi.decode(b"\0" * 100, 100)


def test_concat_keeps_the_record_layout():
    a = abi.empty(2)
    a["orig_dport_be"] = [443, 53]
    joined = abi.concat([a, a[:1]])
    assert joined.dtype == abi.EVENT_DTYPE and joined.tobytes()[114:116] == b"\x01\xbb"
    assert list(joined["orig_dport_be"]) == [443, 53, 443]
