"""The kernel table doctor reads: versions from what a kernel says of itself, verdicts."""

from __future__ import annotations

from vsockmon.live import kernel_facts as kf


def test_upstream_version_prefers_debians_name_in_proc_version() -> None:
    debian = ("Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian "
              "12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP "
              "PREEMPT_DYNAMIC Debian 6.1.192-3 (2026-10-20)")
    # uname -r says only the ABI (6.1.0-57); /proc/version names the upstream 6.1.192.
    assert kf.upstream_version(debian, "6.1.0-57-amd64") == (6, 1, 192)
    assert kf.upstream_version("", "6.12.117+deb12-amd64") == (6, 12, 117)
    assert kf.upstream_version("Linux version 6.18.44 (gcc)", "6.18.44-custom") == (6, 18, 44)
    assert kf.upstream_version("", "not-a-kernel") is None


def test_verdicts_for_measured_and_unmeasured_kernels() -> None:
    ids = [d.id for d in kf.DEFECTS]
    assert ids == ["split-tap-length", "nonlinear-tap", "skb-overhead-reset"]
    old = {d.id: (has, why) for d, has, why in kf.verdicts((6, 1, 192))}
    assert old["split-tap-length"][0] is True
    assert old["nonlinear-tap"][0] is False and "refused" in old["nonlinear-tap"][1]
    new = {d.id: has for d, has, _ in kf.verdicts((6, 12, 117))}
    assert new == {"split-tap-length": False, "nonlinear-tap": False,
                   "skb-overhead-reset": False}
    for version in (None, (6, 12, 116), (5, 10, 0)):
        for d, has, why in kf.verdicts(version):
            assert has is None and why.startswith("not measured") and d.history in why


def test_every_measured_kernel_answers_for_every_defect() -> None:
    for measured in kf.MEASURED.values():
        assert set(measured.has) == set(measured.how) == {d.id for d in kf.DEFECTS}
