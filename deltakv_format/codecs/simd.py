"""Vector building blocks of the codec kernels, written as LLVM vector IR (Numba intrinsics).

LLVM's auto-vectoriser does not reliably vectorise the codecs' inner loops (nibble unpacking, the
Walsh-Hadamard butterflies, per-block searches with ordered reductions), so these intrinsics spell the
vector code out: ``<16 x float>`` / ``<16 x i32>`` operations that LLVM maps onto AVX-512, AVX2 or SSE
(whatever the host has; the IR itself is target independent). They are called from the ``@njit``
kernels of ``kernels.py`` and inlined there.

Bit-exactness (SPEC.md section 5): every float operation here is an IEEE ``fadd`` / ``fsub`` /
``fmul`` / ``fdiv`` / ``rint`` / ``floor`` without fast-math flags, so LLVM may neither contract
``a * b + c`` into an FMA nor reassociate. Operands keep the order of the scalar definitions
(``state + step``, Walsh-Hadamard ``a + b`` and ``a - b`` with ``a`` the lower index). Within one
Walsh-Hadamard stage the butterflies are independent, so computing them in vector lanes gives the
bits of the sequential definition; stages stay in order h = 1, 2, 4, ... In the in-register stages
(h < 16) ``a - b`` is computed as ``(-b) + a`` (sign flip, then the same add as the ``a + b``
lanes), which IEEE 754 defines to be the same operation for every non-NaN operand, signed zeros
and infinities included (only the sign of a NaN produced from a NaN may differ, which neither
IEEE nor LLVM pins down; finite data never produce a NaN). Ordered sums (the encoders' squared
errors and least-squares sums) are accumulated in index order, one lane per sum.

Where the host has F16C, f32 -> f16 uses the hardware conversion (``vcvtps2ph``, round to
nearest even, subnormals) and falls back to the integer form for a vector that has an infinite or
NaN result, so saturation and canonical NaNs stay as specified (checked on all 2^32 inputs).

Arrays must be C-contiguous (the kernels guarantee it); offsets and counts are in elements. No
bounds are checked: callers pass in-range offsets.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..numerics import ir_f16_to_f32, ir_f32_to_bf16, ir_f32_to_f16, ir_f32_to_f16_ggml

F32 = ir.FloatType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
W = 16  # lanes of the vector type used throughout (one AVX-512 register of f32)

# Candidate code levels of the dkv-q4 scale search (SPEC.md 6.2), in the reference encoder's order.
SEARCH_LEVELS = (-8.0, -7.5, -7.0, -6.5, 7.0, 6.5, 6.0)


# ---- IR helpers ---------------------------------------------------------------------------------


def _vt(t, n=W):
    return t if n == 1 else ir.VectorType(t, n)


def _k(t, x, n=W):
    """Constant: scalar (n == 1), splat, or per-lane list."""
    if isinstance(x, (list, tuple)):
        return ir.Constant(ir.VectorType(t, len(x)), list(x))
    return ir.Constant(t, x) if n == 1 else ir.Constant(ir.VectorType(t, n), [x] * n)


def _splat(b, x, n=W):
    if n == 1:
        return x
    v = b.insert_element(ir.Constant(ir.VectorType(x.type, n), None), x, ir.Constant(I32, 0))
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), [0] * n))


def _data(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


def _i64(context, builder, value, ty):
    return context.cast(builder, value, ty, types.int64)


def _align(t):
    return 4 if isinstance(t, ir.FloatType) else max(1, t.width // 8)


def _load(b, ptr, idx, t, n=W):
    """Load n elements of type t at ptr[idx] (ptr's element type may differ: bits are reinterpreted)."""
    p = b.bitcast(b.gep(ptr, [idx]), _vt(t, n).as_pointer())
    return b.load(p, align=_align(t))


def _store(b, value, ptr, idx):
    t = value.type.element if isinstance(value.type, ir.VectorType) else value.type
    p = b.bitcast(b.gep(ptr, [idx]), value.type.as_pointer())
    b.store(value, p, align=_align(t))


def _add(b, idx, x):
    return b.add(idx, ir.Constant(I64, x))


def _mul(b, idx, x):
    return b.mul(idx, ir.Constant(I64, x))


def _call(b, name, ret, args):
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return b.call(fn, args)


def _vname(t):
    """LLVM intrinsic type suffix: f32, v16f32, ..."""
    el = t.element if isinstance(t, ir.VectorType) else t
    base = "f32" if isinstance(el, ir.FloatType) else "i%d" % el.width
    return "v%d%s" % (t.count, base) if isinstance(t, ir.VectorType) else base


def _rint(b, v):
    return _call(b, "llvm.rint." + _vname(v.type), v.type, [v])


def _floor(b, v):
    return _call(b, "llvm.floor." + _vname(v.type), v.type, [v])


def _is_u32(aryty):
    return aryty.dtype.bitwidth == 32


def _loop(b, count, body):
    """for i in range(count): body(i) (i64)."""
    with cgutils.for_range(b, count) as loop:
        body(loop.index)


def _kind_switch(b, kind, gens):
    """Run gens[0] when kind == 0 (f16), else gens[1] (bf16), as one branch outside the loops."""
    is_f16 = b.icmp_signed("==", kind, ir.Constant(kind.type, 0))
    with b.if_else(is_f16) as (then, other):
        with then:
            gens[0]()
        with other:
            gens[1]()


_F16C = []


def _has_f16c():
    """Whether Numba compiles for a CPU with F16C (hardware f32 -> f16 conversion, ``vcvtps2ph``)."""
    if not _F16C:
        from numba.core.registry import cpu_target

        features = getattr(cpu_target.target_context.codegen(), "_tm_features", "") or ""
        _F16C.append("+f16c" in features.split(","))
    return _F16C[0]


def _f16_bits(b, v):
    """f32 lanes -> SPEC.md f16 bits (i16 lanes).

    With F16C the hardware conversion (IEEE round to nearest even, subnormals kept) gives the bits
    of every lane whose result is finite; when any lane's result has the all-ones exponent (an
    infinity from overflow or from an infinite input, or a NaN), the whole vector takes the
    integer path ``ir_f32_to_f16`` instead (saturation, canonical NaN), so results never differ.
    """
    n = v.type.count if isinstance(v.type, ir.VectorType) else 1
    exact = lambda: b.trunc(ir_f32_to_f16(b, v), _vt(I16, n))  # noqa: E731
    if n == 1 or not _has_f16c():
        return exact()
    h = b.bitcast(b.fptrunc(v, _vt(ir.HalfType(), n)), _vt(I16, n))
    special = b.icmp_unsigned("==", b.and_(h, _k(I16, 0x7C00, n)), _k(I16, 0x7C00, n))
    any_special = b.icmp_unsigned("!=", b.bitcast(special, ir.IntType(n)), ir.Constant(ir.IntType(n), 0))
    slot = cgutils.alloca_once(b, h.type)
    b.store(h, slot)
    with b.if_then(any_special, likely=False):
        b.store(exact(), slot)
    return b.load(slot)


def _emit(b, v, dst, idx, out_kind):
    """Store f32 values v as output bits at dst[idx]: out_kind 'f16', 'bf16' or 'f32'."""
    n = v.type.count if isinstance(v.type, ir.VectorType) else 1
    if out_kind == "f32":
        _store(b, b.bitcast(v, _vt(I32, n)), dst, idx)
    elif out_kind == "f16":
        _store(b, _f16_bits(b, v), dst, idx)
    else:
        _store(b, b.trunc(ir_f32_to_bf16(b, v), _vt(I16, n)), dst, idx)


def _emit_bounded(b, vs, dst, off, out_kind, d, bound):
    """Emit the vectors vs (stored at dst[off], dst[off + 16], ...), all of magnitude <= |d| * bound.

    For f16 output with F16C, when |d| * bound cannot reach 65520 (the f16 overflow threshold) no lane
    can round to infinity, so the plain hardware conversion is exact for the whole block."""
    def store_all(fast):
        for k, v in enumerate(vs):
            if fast:
                _store(b, b.bitcast(b.fptrunc(v, _vt(ir.HalfType())), _vt(I16)), dst, _add(b, off, W * k))
            else:
                _emit(b, v, dst, _add(b, off, W * k), out_kind)

    if out_kind != "f16" or not _has_f16c():
        store_all(False)
        return
    small = b.fcmp_ordered("<=", _call(b, "llvm.fabs.f32", F32, [d]), ir.Constant(F32, 65504.0 / bound))
    with b.if_else(small, likely=True) as (then, other):
        with then:
            store_all(True)
        with other:
            store_all(False)


def _source_to_f32(b, bits, in_kind):
    """Source bit patterns (i16 or i32 lanes) -> f32 lanes, exactly."""
    n = bits.type.count if isinstance(bits.type, ir.VectorType) else 1
    if in_kind == "f32":
        return b.bitcast(bits, _vt(F32, n))
    w = b.zext(bits, _vt(I32, n))
    if in_kind == "f16":
        return ir_f16_to_f32(b, w)
    return b.bitcast(b.shl(w, _k(I32, 16, n)), _vt(F32, n))


def _out_kinds(aryty):
    """The output kinds a bits array can take: uint32 -> f32; uint16 -> f16 or bf16 (runtime kind)."""
    return ("f32",) if _is_u32(aryty) else ("f16", "bf16")


def _for_kinds(b, aryty, kind, gen):
    kinds = _out_kinds(aryty)
    if len(kinds) == 1:
        gen(kinds[0])
    else:
        _kind_switch(b, kind, [lambda: gen("f16"), lambda: gen("bf16")])


def _check_arrays(*arys):
    return all(isinstance(a, types.Array) for a in arys)


def _check_ints(*vals):
    return all(isinstance(v, (types.Integer, types.Boolean)) for v in vals)


# ---- element conversion of whole rows --------------------------------------------------------------


@intrinsic
def load_row(typingctx, src, soff, dst, doff, n, kind):
    """dst[doff:doff+n] (float32) = exact f32 of source bits src[soff:soff+n] (uint16 f16/bf16 by kind, uint32 f32)."""
    if not (_check_arrays(src, dst) and _check_ints(soff, doff, n, kind)):
        return None
    sig = types.void(src, soff, dst, doff, n, kind)

    def codegen(context, b, signature, args):
        st, so, dt, do, nt, kt = signature.args
        sp = _data(context, b, st, args[0])
        dp = _data(context, b, dt, args[2])
        so = _i64(context, b, args[1], so)
        do = _i64(context, b, args[3], do)
        n = _i64(context, b, args[4], nt)
        kind = _i64(context, b, args[5], kt)
        elt = I32 if _is_u32(st) else I16
        n16 = b.udiv(n, ir.Constant(I64, W))

        def gen(in_kind):
            def body(i):
                c = _mul(b, i, W)
                _store(b, _source_to_f32(b, _load(b, sp, b.add(so, c), elt), in_kind), dp, b.add(do, c))

            def tail(i):
                _store(b, _source_to_f32(b, _load(b, sp, b.add(so, i), elt, 1), in_kind), dp, b.add(do, i))

            _loop(b, n16, body)
            with cgutils.for_range_slice(b, _mul(b, n16, W), n, ir.Constant(I64, 1)) as (i, _):
                tail(i)

        if _is_u32(st):
            gen("f32")
        else:
            _kind_switch(b, kind, [lambda: gen("f16"), lambda: gen("bf16")])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def emit_row(typingctx, src, soff, dst, doff, n, kind):
    """dst[doff:doff+n] = output bits (SPEC.md emit) of float32 src[soff:soff+n]."""
    if not (_check_arrays(src, dst) and _check_ints(soff, doff, n, kind)):
        return None
    sig = types.void(src, soff, dst, doff, n, kind)

    def codegen(context, b, signature, args):
        st, so, dt, do, nt, kt = signature.args
        sp = _data(context, b, st, args[0])
        dp = _data(context, b, dt, args[2])
        so = _i64(context, b, args[1], so)
        do = _i64(context, b, args[3], do)
        n = _i64(context, b, args[4], nt)
        kind = _i64(context, b, args[5], kt)
        n16 = b.udiv(n, ir.Constant(I64, W))

        def gen(out_kind):
            def body(i):
                c = _mul(b, i, W)
                _emit(b, _load(b, sp, b.add(so, c), F32), dp, b.add(do, c), out_kind)

            _loop(b, n16, body)
            with cgutils.for_range_slice(b, _mul(b, n16, W), n, ir.Constant(I64, 1)) as (i, _):
                _emit(b, _load(b, sp, b.add(so, i), F32, 1), dp, b.add(do, i), out_kind)

        _for_kinds(b, dt, kind, gen)
        return context.get_dummy_value()

    return sig, codegen


# ---- Walsh-Hadamard ------------------------------------------------------------------------------


def _wht(b, vs, size):
    """SPEC.md H_size on size/16 vectors of 16 consecutive values; returns the new vectors."""
    vs = list(vs)
    for h in (1, 2, 4, 8):
        if h >= size:
            break
        perm = ir.Constant(ir.VectorType(I32, W), [j ^ h for j in range(W)])
        sign = ir.Constant(ir.VectorType(I32, W), [0 if (j & h) == 0 else -2**31 for j in range(W)])
        for k, x in enumerate(vs):
            y = b.shuffle_vector(x, x, perm)  # y[j] = x[j ^ h]
            # lane j with j & h == 0: a + b = x[j] + x[j + h]; else a - b = x[j - h] - x[j] = (-x[j]) + x[j - h]
            xs = b.bitcast(b.xor(b.bitcast(x, _vt(I32)), sign), _vt(F32))
            vs[k] = b.fadd(xs, y)
    h = W
    while h < size:
        step = h // W
        for k in range(len(vs)):
            if k & step == 0:
                a, c = vs[k], vs[k + step]
                vs[k], vs[k + step] = b.fadd(a, c), b.fsub(a, c)
        h *= 2
    scale = _k(F32, {16: 0.25, 64: 0.125, 256: 0.0625}[size])
    return [b.fmul(v, scale) for v in vs]


def _size_switch(b, size, gen):
    """gen(s) for the runtime rotation size s in (16, 64, 256) (anything else: 256)."""
    with b.if_else(b.icmp_signed("==", size, ir.Constant(I64, 16))) as (then, other):
        with then:
            gen(16)
        with other:
            with b.if_else(b.icmp_signed("==", size, ir.Constant(I64, 64))) as (then2, other2):
                with then2:
                    gen(64)
                with other2:
                    gen(256)


@intrinsic
def wht_row(typingctx, src, dst, n, size):
    """dst[:n] = H_size of float32 src[:n] (group by group); dst may be src."""
    if not (_check_arrays(src, dst) and _check_ints(n, size)):
        return None
    sig = types.void(src, dst, n, size)

    def codegen(context, b, signature, args):
        st, dt, nt, zt = signature.args
        sp = _data(context, b, st, args[0])
        dp = _data(context, b, dt, args[1])
        n = _i64(context, b, args[2], nt)
        size = _i64(context, b, args[3], zt)

        def gen(s):
            def body(g):
                base = _mul(b, g, s)
                vs = [_load(b, sp, _add(b, base, W * k), F32) for k in range(s // W)]
                for k, v in enumerate(_wht(b, vs, s)):
                    _store(b, v, dp, _add(b, base, W * k))

            _loop(b, b.udiv(n, ir.Constant(I64, s)), body)

        _size_switch(b, size, gen)
        return context.get_dummy_value()

    return sig, codegen


# ---- Q4_0 / Q8_0 blocks: decode -----------------------------------------------------------------


def _scale(b, qp, base):
    """f32 of the block's little-endian f16 scale at qp[base], qp[base + 1].

    With F16C: the hardware widening (exact; it only quiets a signalling NaN, which cannot change a
    result here: the scale only ever enters a multiplication, which quiets it anyway)."""
    if _has_f16c():
        h = b.load(b.bitcast(b.gep(qp, [base]), I16.as_pointer()), align=1)
        return b.fpext(b.bitcast(h, ir.HalfType()), F32)
    lo = b.zext(b.load(b.gep(qp, [base])), I32)
    hi = b.zext(b.load(b.gep(qp, [_add(b, base, 1)])), I32)
    return ir_f16_to_f32(b, b.or_(lo, b.shl(hi, ir.Constant(I32, 8))))


def _q4_steps(b, qp, base, d):
    """The block's 32 values f32(d) * f32(q - 8) as two 16-lane vectors (values 0..15, 16..31)."""
    w = b.zext(_load(b, qp, _add(b, base, 2), I8), _vt(I32))
    lo = b.sub(b.and_(w, _k(I32, 0xF)), _k(I32, 8))
    hi = b.sub(b.lshr(w, _k(I32, 4)), _k(I32, 8))
    ds = _splat(b, d)
    return b.fmul(ds, b.sitofp(lo, _vt(F32))), b.fmul(ds, b.sitofp(hi, _vt(F32)))


def _apply_block(b, qp, sp, mp, blk, has_modes):
    """Apply delta block blk to the state at sp (SPEC.md 6.2); returns the block's two new state vectors."""
    base = _mul(b, blk, 18)
    d = _scale(b, qp, base)
    byte = b.zext(b.load(b.gep(mp, [b.lshr(blk, ir.Constant(I64, 3))])), I64)
    bit = b.and_(b.lshr(byte, b.and_(blk, ir.Constant(I64, 7))), ir.Constant(I64, 1))
    inter = _splat(b, b.or_(b.icmp_signed("!=", bit, ir.Constant(I64, 0)), b.not_(has_modes)))
    lo, hi = _q4_steps(b, qp, base, d)
    off = _mul(b, blk, 32)
    s0 = b.select(inter, b.fadd(_load(b, sp, off, F32), lo), lo)
    s1 = b.select(inter, b.fadd(_load(b, sp, _add(b, off, W), F32), hi), hi)
    _store(b, s0, sp, off)
    _store(b, s1, sp, _add(b, off, W))
    return [s0, s1]


@intrinsic
def q4_apply_row(typingctx, qrow, state, nb, mrow, has_modes, dst, emit, rotation, kind):
    """One delta row (SPEC.md 6.2): for each block b, state = (inter ? state : 0) + f32(d) * f32(q - 8),
    inter = bit b of mrow when has_modes, else 1 (qrow: uint8 Q4_0 blocks; state: float32; mrow is read
    either way). When ``emit``, also dst[:32 nb] = output bits of H_rotation(state) (or of the state when
    rotation is 0), computed from the new state while it is in registers."""
    if not (_check_arrays(qrow, state, mrow, dst) and _check_ints(nb, has_modes, emit, rotation, kind)):
        return None
    sig = types.void(qrow, state, nb, mrow, has_modes, dst, emit, rotation, kind)

    def codegen(context, b, signature, args):
        qt, st, nt, mt, ht, dt, et, rt, kt = signature.args
        qp = _data(context, b, qt, args[0])
        sp = _data(context, b, st, args[1])
        nb = _i64(context, b, args[2], nt)
        mp = _data(context, b, mt, args[3])
        has_modes = b.icmp_signed("!=", _i64(context, b, args[4], ht), ir.Constant(I64, 0))
        dp = _data(context, b, dt, args[5])
        emit = b.icmp_signed("!=", _i64(context, b, args[6], et), ir.Constant(I64, 0))
        rotation = _i64(context, b, args[7], rt)
        kind = _i64(context, b, args[8], kt)

        def gen_emit(out_kind, rot):
            per = max(32, rot) // 32  # blocks per step: one rotation group, or one block
            n_steps = b.udiv(nb, ir.Constant(I64, per))

            def rotated(vs):
                if not rot:
                    return vs
                n = rot // W
                return [v for i in range(0, len(vs), n) for v in _wht(b, vs[i:i + n], rot)]

            if out_kind != "f16" or not _has_f16c():
                def body(g):
                    vs = []
                    for k in range(per):
                        vs += _apply_block(b, qp, sp, mp, _add(b, _mul(b, g, per), k), has_modes)
                    for k, v in enumerate(rotated(vs)):
                        _emit(b, v, dp, _add(b, _mul(b, g, 32 * per), W * k), out_kind)

                _loop(b, n_steps, body)
                return

            # f16 with F16C: plain hardware conversions, tracking the largest |result| bits of the row;
            # if any lane came out infinite or NaN (exponent all ones), emit the whole row again from
            # the (already updated) state with the exact conversion.
            def body_fast(g, acc):
                vs = []
                for k in range(per):
                    vs += _apply_block(b, qp, sp, mp, _add(b, _mul(b, g, per), k), has_modes)
                acc = acc[0]
                for k, v in enumerate(rotated(vs)):
                    h = b.bitcast(b.fptrunc(v, _vt(ir.HalfType())), _vt(I16))
                    _store(b, h, dp, _add(b, _mul(b, g, 32 * per), W * k))
                    a = b.and_(h, _k(I16, 0x7FFF))
                    acc = b.select(b.icmp_unsigned(">", a, acc), a, acc)
                return [acc]

            (acc,) = _accumulate(b, n_steps, [_k(I16, 0)], body_fast)
            top = _call(b, "llvm.vector.reduce.umax.v16i16", I16, [acc])
            with b.if_then(b.icmp_unsigned(">=", top, ir.Constant(I16, 0x7C00)), likely=False):
                def body_exact(g):
                    base = _mul(b, g, 32 * per)
                    vs = [_load(b, sp, _add(b, base, W * k), F32) for k in range(2 * per)]
                    for k, v in enumerate(rotated(vs)):
                        _store(b, b.trunc(ir_f32_to_f16(b, v), _vt(I16)), dp, _add(b, base, W * k))

                _loop(b, n_steps, body_exact)

        def gen_kind(out_kind):
            with b.if_else(b.icmp_signed("==", rotation, ir.Constant(I64, 0))) as (plain, rotated):
                with plain:
                    gen_emit(out_kind, 0)
                with rotated:
                    _size_switch(b, rotation, lambda s: gen_emit(out_kind, s))

        with b.if_else(emit) as (then, other):
            with then:
                _for_kinds(b, dt, kind, gen_kind)
            with other:
                _loop(b, nb, lambda blk: _apply_block(b, qp, sp, mp, blk, has_modes))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def q4_emit_row(typingctx, qrow, nb, dst, kind):
    """dst[:32 nb] = output bits of the Q4_0 row's values f32(d) * f32(q - 8)."""
    if not (_check_arrays(qrow, dst) and _check_ints(nb, kind)):
        return None
    sig = types.void(qrow, nb, dst, kind)

    def codegen(context, b, signature, args):
        qt, nt, dt, kt = signature.args
        qp = _data(context, b, qt, args[0])
        nb = _i64(context, b, args[1], nt)
        dp = _data(context, b, dt, args[2])
        kind = _i64(context, b, args[3], kt)

        def gen(out_kind):
            def body(blk):
                base = _mul(b, blk, 18)
                d = _scale(b, qp, base)
                _emit_bounded(b, _q4_steps(b, qp, base, d), dp, _mul(b, blk, 32), out_kind, d, 8.0)

            _loop(b, nb, body)

        _for_kinds(b, dt, kind, gen)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def q8_emit_row(typingctx, qrow, nb, dst, kind):
    """dst[:32 nb] = output bits of the Q8_0 row's values f32(d) * f32(q)."""
    if not (_check_arrays(qrow, dst) and _check_ints(nb, kind)):
        return None
    sig = types.void(qrow, nb, dst, kind)

    def codegen(context, b, signature, args):
        qt, nt, dt, kt = signature.args
        qp = _data(context, b, qt, args[0])
        nb = _i64(context, b, args[1], nt)
        dp = _data(context, b, dt, args[2])
        kind = _i64(context, b, args[3], kt)

        def gen(out_kind):
            def body(blk):
                base = _mul(b, blk, 34)
                d = _scale(b, qp, base)
                ds = _splat(b, d)
                vs = [b.fmul(ds, b.sitofp(b.sext(_load(b, qp, _add(b, base, 2 + W * half), I8), _vt(I32)), _vt(F32)))
                      for half in range(2)]
                _emit_bounded(b, vs, dp, _mul(b, blk, 32), out_kind, d, 128.0)

            _loop(b, nb, body)

        _for_kinds(b, dt, kind, gen)
        return context.get_dummy_value()

    return sig, codegen


# ---- encoders ------------------------------------------------------------------------------------


def _first_absmax(b, xp, off):
    """(signed value, |value| bits) of the first of the 32 values at xp[off] with the largest |x|;
    (+0.0, 0) when all are zero. |x| ordering equals integer ordering of the |x| bits (no NaN)."""
    x0 = _load(b, xp, off, I32)
    x1 = _load(b, xp, _add(b, off, W), I32)
    a0 = b.and_(x0, _k(I32, 0x7FFFFFFF))
    a1 = b.and_(x1, _k(I32, 0x7FFFFFFF))
    m = b.select(b.icmp_unsigned(">", a0, a1), a0, a1)
    amax = _call(b, "llvm.vector.reduce.umax.v16i32", I32, [m])
    sa = _splat(b, amax)
    e0 = b.zext(b.bitcast(b.icmp_unsigned("==", a0, sa), I16), I32)
    e1 = b.zext(b.bitcast(b.icmp_unsigned("==", a1, sa), I16), I32)
    mask = b.or_(e0, b.shl(e1, ir.Constant(I32, 16)))
    idx = _call(b, "llvm.cttz.i32", I32, [mask, ir.Constant(I1, 0)])
    v = b.load(b.bitcast(b.gep(xp, [b.add(off, b.zext(idx, I64))]), I32.as_pointer()), align=4)
    v = b.select(b.icmp_unsigned("==", amax, ir.Constant(I32, 0)), ir.Constant(I32, 0), v)
    return b.bitcast(v, F32), amax


def _inv(b, d):
    """1 / d if d != 0 else 0 (Python semantics: NaN != 0)."""
    zero = _k(F32, 0.0, d.type.count if isinstance(d.type, ir.VectorType) else 1)
    one = _k(F32, 1.0, d.type.count if isinstance(d.type, ir.VectorType) else 1)
    return b.select(b.fcmp_unordered("!=", d, zero), b.fdiv(one, d), zero)


def _codes(b, x, inv, n):
    """Q4 codes of the dkv encoder as f32 in [0, 15]: clamp(rint(x * inv) + 8)."""
    v = b.fadd(_rint(b, b.fmul(x, inv)), _k(F32, 8.0, n))
    v = b.select(b.fcmp_ordered("<", v, _k(F32, 0.0, n)), _k(F32, 0.0, n), v)
    return b.select(b.fcmp_ordered(">", v, _k(F32, 15.0, n)), _k(F32, 15.0, n), v)


def _kcode(b, x, inv, n=W):
    """k = q - 8 for the dkv codes q = clamp(rint(x * inv) + 8, 0, 15), computed as rint(clamp(x * inv, -8, 7))
    with rint by the 1.5 * 2^23 trick (exact RNE for |y| <= 2^22). Equal to the definition except that a
    zero k may be -0.0 instead of +0.0, which changes no error or least-squares sum (the squares, and the
    sums that start at +0.0, cannot tell): the codes written to the file come from ``_codes``."""
    y = b.fmul(x, inv)
    y = b.select(b.fcmp_ordered("<", y, _k(F32, -8.0, n)), _k(F32, -8.0, n), y)
    y = b.select(b.fcmp_ordered(">", y, _k(F32, 7.0, n)), _k(F32, 7.0, n), y)
    magic = _k(F32, 12582912.0, n)
    return b.fsub(b.fadd(y, magic), magic)


def _transpose16(b, rows):
    """16 vectors of 16 lanes -> their transpose (four rounds of pairwise zips)."""
    lo = ir.Constant(ir.VectorType(I32, W), [x for i in range(8) for x in (i, W + i)])
    hi = ir.Constant(ir.VectorType(I32, W), [x for i in range(8, W) for x in (i, W + i)])
    v = list(rows)
    for _ in range(4):
        nxt = []
        for i in range(8):
            nxt += [b.shuffle_vector(v[i], v[i + 8], lo), b.shuffle_vector(v[i], v[i + 8], hi)]
        v = nxt
    return v


def _accumulate(b, count, init, body):
    """An IR loop over i in range(count) carrying accumulators: init -> body(i, values) -> values."""
    ptrs = [cgutils.alloca_once_value(b, v) for v in init]
    with cgutils.for_range(b, count) as loop:
        new = body(loop.index, [b.load(p) for p in ptrs])
        for p, v in zip(ptrs, new):
            b.store(v, p)
    return [b.load(p) for p in ptrs]


@intrinsic
def dkv_search_group(typingctx, res, tgt, base, g0, nb, adaptive, hs, inters):
    """The reference dkv-q4 scale search and intra/inter choice for blocks g0 .. g0+15 of one row.

    One vector lane per block (lanes past the row's last block repeat it and are ignored), so every
    ordered sum of the scalar definition (errors, least-squares sums: over the block's values in
    index order) stays a sequential sum within its lane. Per block and mode (inter: codes of the
    residual ``res``, reconstruction base + d * (q - 8); intra: codes of the target ``tgt``,
    reconstruction d * (q - 8); errors against tgt):

    - vmax = the first value of largest magnitude; all zero: scale 0 (codes 8), error 0, done;
    - candidates f16(vmax / level), level in SEARCH_LEVELS order; the first least error wins;
    - refit: k = codes of the winner - 8, d = f16(sum x k / sum k k) if sum k k > 0, kept if d is
      finite and below 65504 and its error is strictly less.

    Then intra is chosen when ``adaptive`` and its error is strictly less than inter's. Writes
    hs[l] = f16 bits of the chosen scale, inters[l] = 1 for inter, 0 for intra.
    """
    if not (_check_arrays(res, tgt, base, hs, inters) and _check_ints(g0, nb, adaptive)):
        return None
    sig = types.void(res, tgt, base, g0, nb, adaptive, hs, inters)

    def codegen(context, b, signature, args):
        rt, tt, bt, gt, nt, at, ht, it = signature.args
        rp = _data(context, b, rt, args[0])
        tp = _data(context, b, tt, args[1])
        bp = _data(context, b, bt, args[2])
        g0 = _i64(context, b, args[3], gt)
        nb = _i64(context, b, args[4], nt)
        adaptive = b.icmp_signed("!=", _i64(context, b, args[5], at), ir.Constant(I64, 0))
        vty = _vt(F32)
        zero = _k(F32, 0.0)
        n32 = ir.Constant(I64, 32)

        # Transpose the 16 blocks into lanes: X[j] = <x[block_l * 32 + j] for l in 0..15>.
        last = b.sub(nb, ir.Constant(I64, 1))
        offs = []
        for lane in range(W):
            blk = _add(b, g0, lane)
            blk = b.select(b.icmp_signed("<", blk, nb), blk, last)
            offs.append(_mul(b, blk, 32))
        arrays = [cgutils.alloca_once(b, ir.ArrayType(vty, 32)) for _ in range(3)]
        R, T, B = arrays
        for src, dst in ((tp, T), (bp, B)):
            for tile in range(2):
                rows = [_load(b, src, _add(b, offs[lane], W * tile), F32) for lane in range(W)]
                for jj, v in enumerate(_transpose16(b, rows)):
                    b.store(v, b.gep(dst, [ir.Constant(I64, 0), ir.Constant(I64, W * tile + jj)]))

        def residual(j):  # the same f32 subtraction as the kernel's residual row
            b.store(b.fsub(b.load(b.gep(T, [ir.Constant(I64, 0), j])), b.load(b.gep(B, [ir.Constant(I64, 0), j]))),
                    b.gep(R, [ir.Constant(I64, 0), j]))

        _loop(b, n32, residual)

        def at_(arr, j):
            return b.load(b.gep(arr, [ir.Constant(I64, 0), j]))

        def search(src_arr, inter):
            # first value of largest magnitude: strict '>' keeps the first
            def vmax_body(j, acc):
                amax, vmax = acc
                x = at_(src_arr, j)
                a = _call(b, "llvm.fabs.v16f32", vty, [x])
                upd = b.fcmp_ordered(">", a, amax)
                return [b.select(upd, a, amax), b.select(upd, x, vmax)]

            _, vmax = _accumulate(b, n32, [zero, zero], vmax_body)
            hs_ = [ir_f32_to_f16(b, b.fdiv(vmax, _k(F32, level))) for level in SEARCH_LEVELS]
            ds = [ir_f16_to_f32(b, h) for h in hs_]
            invs = [_inv(b, d) for d in ds]

            def err_body(j, errs):
                x, t = at_(src_arr, j), at_(T, j)
                bj = at_(B, j) if inter else None
                out = []
                for d, inv, err in zip(ds, invs, errs):
                    r = b.fmul(d, _kcode(b, x, inv))
                    if inter:
                        r = b.fadd(bj, r)
                    e = b.fsub(r, t)
                    out.append(b.fadd(err, b.fmul(e, e)))
                return out

            errs = _accumulate(b, n32, [zero] * len(ds), err_body)
            best_err, best_h = _k(F32, float("inf")), _k(I32, 0)
            for err, h in zip(errs, hs_):
                upd = b.fcmp_ordered("<", err, best_err)
                best_err, best_h = b.select(upd, err, best_err), b.select(upd, h, best_h)
            is_zero = b.fcmp_ordered("==", vmax, zero)
            best_err = b.select(is_zero, zero, best_err)
            best_h = b.select(is_zero, _k(I32, 0), best_h)
            return best_err, best_h, is_zero

        err_r, h_r, zero_r = search(R, True)
        err_t, h_t, zero_t = search(T, False)

        # least-squares refit of both modes
        inv_r = _inv(b, ir_f16_to_f32(b, h_r))
        inv_t = _inv(b, ir_f16_to_f32(b, h_t))

        def sums_body(j, acc):
            out = []
            for (num, den), x, inv in zip((acc[0:2], acc[2:4]), (at_(R, j), at_(T, j)), (inv_r, inv_t)):
                k = _kcode(b, x, inv)
                out += [b.fadd(num, b.fmul(x, k)), b.fadd(den, b.fmul(k, k))]
            return out

        num_r, den_r, num_t, den_t = _accumulate(b, n32, [zero] * 4, sums_body)

        def refit(num, den, is_zero):
            h = ir_f32_to_f16(b, b.fdiv(num, den))
            d = ir_f16_to_f32(b, h)
            ok = b.and_(b.fcmp_ordered(">", den, zero), b.not_(is_zero))
            ok = b.and_(ok, b.fcmp_ordered("==", d, d))
            ok = b.and_(ok, b.fcmp_ordered("<", _call(b, "llvm.fabs.v16f32", vty, [d]), _k(F32, 65504.0)))
            return h, d, ok

        h_r2, d_r2, ok_r = refit(num_r, den_r, zero_r)
        h_t2, d_t2, ok_t = refit(num_t, den_t, zero_t)
        inv_r2, inv_t2 = _inv(b, d_r2), _inv(b, d_t2)

        def pair_body(j, errs):
            x, t, bj = at_(R, j), at_(T, j), at_(B, j)
            e_r = b.fsub(b.fadd(bj, b.fmul(d_r2, _kcode(b, x, inv_r2))), t)
            e_t = b.fsub(b.fmul(d_t2, _kcode(b, t, inv_t2)), t)
            return [b.fadd(errs[0], b.fmul(e_r, e_r)), b.fadd(errs[1], b.fmul(e_t, e_t))]

        err_r2, err_t2 = _accumulate(b, n32, [zero, zero], pair_body)
        upd = b.and_(ok_r, b.fcmp_ordered("<", err_r2, err_r))
        err_r, h_r = b.select(upd, err_r2, err_r), b.select(upd, h_r2, h_r)
        upd = b.and_(ok_t, b.fcmp_ordered("<", err_t2, err_t))
        err_t, h_t = b.select(upd, err_t2, err_t), b.select(upd, h_t2, h_t)

        intra = b.and_(b.fcmp_ordered("<", err_t, err_r), _splat(b, adaptive))
        _store(b, b.select(intra, h_t, h_r), _data(context, b, ht, args[6]), ir.Constant(I64, 0))
        _store(b, b.select(intra, _k(I32, 0), _k(I32, 1)), _data(context, b, it, args[7]), ir.Constant(I64, 0))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def write_q4_codes(typingctx, src, off, d, qrow, qbase):
    """qrow[qbase+2 : qbase+18] = the packed dkv codes clamp(rint(src_j / d) + 8) of src[off:off+32]."""
    if not (_check_arrays(src, qrow) and _check_ints(off, qbase)):
        return None
    sig = types.void(src, off, d, qrow, qbase)

    def codegen(context, b, signature, args):
        st, ot, _, qt, bt = signature.args
        sp = _data(context, b, st, args[0])
        off = _i64(context, b, args[1], ot)
        qp = _data(context, b, qt, args[3])
        qbase = _i64(context, b, args[4], bt)
        inv = _splat(b, _inv(b, args[2]))
        lo = b.fptosi(_codes(b, _load(b, sp, off, F32), inv, W), _vt(I32))
        hi = b.fptosi(_codes(b, _load(b, sp, _add(b, off, W), F32), inv, W), _vt(I32))
        packed = b.or_(lo, b.shl(hi, _k(I32, 4)))
        _store(b, b.trunc(packed, _vt(I8)), qp, _add(b, qbase, 2))
        return context.get_dummy_value()

    return sig, codegen


def _store_scale(b, qp, base, h):
    b.store(b.trunc(h, I8), b.gep(qp, [base]))
    b.store(b.trunc(b.lshr(h, ir.Constant(I32, 8)), I8), b.gep(qp, [_add(b, base, 1)]))


@intrinsic
def q4_0_ggml_row(typingctx, x, xoff, nb, out, ooff):
    """ggml quantize_row_q4_0_ref of nb blocks of float32 x[xoff:] into uint8 out[ooff:], bit for bit."""
    if not (_check_arrays(x, out) and _check_ints(xoff, nb, ooff)):
        return None
    sig = types.void(x, xoff, nb, out, ooff)

    def codegen(context, b, signature, args):
        xt, xo, nt, ot, oo = signature.args
        xp = _data(context, b, xt, args[0])
        xoff = _i64(context, b, args[1], xo)
        nb = _i64(context, b, args[2], nt)
        op = _data(context, b, ot, args[3])
        ooff = _i64(context, b, args[4], oo)

        def body(blk):
            off = b.add(xoff, _mul(b, blk, 32))
            base = b.add(ooff, _mul(b, blk, 18))
            vmax, _ = _first_absmax(b, xp, off)
            d = b.fdiv(vmax, ir.Constant(F32, -8.0))
            _store_scale(b, op, base, ir_f32_to_f16_ggml(b, d))
            inv = _splat(b, _inv(b, d))
            q = []
            for half in range(2):
                v = b.fadd(b.fmul(_load(b, xp, _add(b, off, W * half), F32), inv), _k(F32, 8.5))
                # (int8_t)(x * id + 8.5f): truncation toward zero, 8-bit wrap, then min(15, .)
                qi = b.sext(b.trunc(b.fptosi(v, _vt(I32)), _vt(I8)), _vt(I32))
                qi = b.select(b.icmp_signed("<", qi, _k(I32, 15)), qi, _k(I32, 15))
                q.append(b.and_(qi, _k(I32, 0xF)))
            _store(b, b.trunc(b.or_(q[0], b.shl(q[1], _k(I32, 4))), _vt(I8)), op, _add(b, base, 2))

        _loop(b, nb, body)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def q8_0_ggml_row(typingctx, x, xoff, nb, out, ooff):
    """ggml quantize_row_q8_0_ref of nb blocks of float32 x[xoff:] into uint8 out[ooff:], bit for bit."""
    if not (_check_arrays(x, out) and _check_ints(xoff, nb, ooff)):
        return None
    sig = types.void(x, xoff, nb, out, ooff)

    def codegen(context, b, signature, args):
        xt, xo, nt, ot, oo = signature.args
        xp = _data(context, b, xt, args[0])
        xoff = _i64(context, b, args[1], xo)
        nb = _i64(context, b, args[2], nt)
        op = _data(context, b, ot, args[3])
        ooff = _i64(context, b, args[4], oo)

        def body(blk):
            off = b.add(xoff, _mul(b, blk, 32))
            base = b.add(ooff, _mul(b, blk, 34))
            _, amax_bits = _first_absmax(b, xp, off)
            d = b.fdiv(b.bitcast(amax_bits, F32), ir.Constant(F32, 127.0))
            _store_scale(b, op, base, ir_f32_to_f16_ggml(b, d))
            inv = _splat(b, _inv(b, d))
            for half in range(2):
                v = b.fmul(_load(b, xp, _add(b, off, W * half), F32), inv)
                # roundf: nearest, halfway cases away from zero
                a = _call(b, "llvm.fabs.v16f32", _vt(F32), [v])
                t = _floor(b, a)
                t = b.select(b.fcmp_ordered(">=", b.fsub(a, t), _k(F32, 0.5)), b.fadd(t, _k(F32, 1.0)), t)
                t = b.select(b.fcmp_ordered(">=", v, _k(F32, 0.0)), t, b.fneg(t))
                qi = b.trunc(b.fptosi(t, _vt(I32)), _vt(I8))
                _store(b, qi, op, _add(b, base, 2 + W * half))

        _loop(b, nb, body)
        return context.get_dummy_value()

    return sig, codegen
