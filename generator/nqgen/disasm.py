"""What a confirm function's machine code shows that no header can: the VRF (l3mdev) test of 8e0538d8ee06.

Upstream 5.16 (and any backport) makes ``ipv4_confirm`` (``nf_confirm`` from 6.2) return early for packets
leaving through an l3mdev master at POST_ROUTING: ``state->hook == NF_INET_POST_ROUTING &&
netif_is_l3_master(state->out)``. Compiled, that is a compare of a memory operand with 4 followed by a
single-bit test of a memory operand (``dev->priv_flags & IFF_L3MDEV_MASTER``, often narrowed to one byte).
The code is disassembled with capstone, x86_64 only, as nqgen targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import x86

NF_INET_POST_ROUTING = 4


@dataclass(frozen=True)
class BitTest:
    """One ``test $imm, mem`` after the POST_ROUTING compare: the immediate and the operand size in bytes."""

    imm: int
    size: int

    def bit_positions(self) -> frozenset[int]:
        """Bit numbers of a 32-bit flags word this test can stand for: a byte or word test of a wider field
        tests the same bit shifted by the operand's byte offset within the field, which the code does not show."""
        bit = self.imm.bit_length() - 1
        return frozenset(bit + 8 * k for k in range(0, 4 - self.size + 1))


def l3mdev_tests(code: bytes) -> tuple[BitTest, ...]:
    """The single-bit memory tests that follow a memory compare with NF_INET_POST_ROUTING in ``code``."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    seen_hook = False
    found: list[BitTest] = []
    for insn in md.disasm(code, 0):
        ops = insn.operands
        if len(ops) != 2 or ops[0].type != x86.X86_OP_MEM or ops[1].type != x86.X86_OP_IMM:
            continue
        imm = ops[1].imm & ((1 << (8 * ops[0].size)) - 1)
        if insn.mnemonic.startswith("cmp") and imm == NF_INET_POST_ROUTING:
            seen_hook = True
        elif seen_hook and insn.mnemonic.startswith("test") and imm and imm & (imm - 1) == 0:
            found.append(BitTest(imm=imm, size=ops[0].size))
    return tuple(found)


__all__ = ["BitTest", "l3mdev_tests"]
