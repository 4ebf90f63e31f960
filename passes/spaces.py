"""Channel spaces: a union-find over tensor dimensions, with composition.

Every dimension of every tensor in a graph starts as its own *space*. Op rules
then say which spaces are the same (`unify`) and which are built from others
(`define`): a `view` that splits 768 into 12 x 64 defines the 768-space as the
product heads x head_dim, a `cat` defines its output space as the concatenation
of its inputs'. A space with no definition is an *atom*; atoms are the units a
pruner removes indices from, and a composed space's indices follow from its
atoms' (row-major for products, end to end for concatenations).

Sizes are ints, or sympy expressions for dynamic dims (those are frozen).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy

CAT, PROD = "cat", "prod"


def same_size(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def _product(sizes):
    out = 1
    for s in sizes:
        out = out * s
    return out


@dataclass
class Spaces:
    parent: list = field(default_factory=list)
    size: list = field(default_factory=list)
    definition: dict = field(default_factory=dict)  # root -> (CAT|PROD, [space ids])
    frozen: dict = field(default_factory=dict)  # root -> reason

    # -- building ---------------------------------------------------------------
    def new(self, size) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        if not isinstance(size, int):
            self.frozen[len(self.parent) - 1] = "dynamic size"
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def freeze(self, i: int, reason: str) -> None:
        self.frozen.setdefault(self.find(i), reason)

    def unify(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if not same_size(self.size[ra], self.size[rb]):
            # Rules only unify equal sizes; if one did not, refuse to prune either.
            self.freeze(ra, "size mismatch between unified dims")
            self.freeze(rb, "size mismatch between unified dims")
            return
        da, db = self.definition.get(ra), self.definition.get(rb)
        if da is None:
            ra, rb, da, db = rb, ra, db, da  # the root keeps the definition
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if db is not None:
            self.definition.pop(rb)
            self._merge_definitions(ra, da, db)

    def define(self, a: int, kind: str, parts: list[int]) -> None:
        """Say that space `a` is the CAT or PROD of `parts` (in order)."""
        trivial = 0 if kind == CAT else 1
        for p in parts:
            if kind == PROD and self.size[self.find(p)] == 1:
                self.freeze(p, "size-1 factor")
        parts = [p for p in parts if self.size[self.find(p)] != trivial]
        if not parts:
            return
        if len(parts) == 1:
            self.unify(a, parts[0])
            return
        combine = sum if kind == CAT else _product
        if not same_size(combine(self.size[self.find(p)] for p in parts), self.size[self.find(a)]):
            for p in [a, *parts]:
                self.freeze(p, "inconsistent composition")
            return
        ra = self.find(a)
        if ra in self.definition:
            tmp = self.new(self.size[ra])
            self.definition[tmp] = (kind, list(parts))
            self.unify(ra, tmp)
        else:
            self.definition[ra] = (kind, list(parts))

    def _merge_definitions(self, root, da, db) -> None:
        """Two definitions of one space: make their parts agree, or freeze."""
        (ka, pa), (kb, pb) = da, db
        self.definition[root] = da
        sizes_a = [self.size[self.find(p)] for p in pa]
        sizes_b = [self.size[self.find(p)] for p in pb]
        if ka == kb and len(pa) == len(pb) and all(map(same_size, sizes_a, sizes_b)):
            for x, y in zip(pa, pb):
                self.unify(x, y)
        elif ka == kb == CAT and all(isinstance(s, int) for s in sizes_a + sizes_b):
            # Same concatenation cut at different places: cut both at every boundary.
            cuts = sorted(set(np.cumsum(sizes_a).tolist()) | set(np.cumsum(sizes_b).tolist()))
            for x, y in zip(self._cut(pa, sizes_a, cuts), self._cut(pb, sizes_b, cuts)):
                self.unify(x, y)
        else:
            for p in [root, *pa, *pb]:
                self.freeze(p, "conflicting channel layouts")

    def _cut(self, parts, sizes, cuts) -> list[int]:
        pieces, start = [], 0
        for part, size in zip(parts, sizes):
            inner = [c for c in cuts if start < c < start + size]
            if inner:
                bounds = [start, *inner, start + size]
                sub = [self.new(hi - lo) for lo, hi in zip(bounds, bounds[1:])]
                self.define(part, CAT, sub)
                pieces += sub
            else:
                pieces.append(part)
            start += size
        return pieces

    # -- reading --------------------------------------------------------------
    def finish(self) -> None:
        """Close the frozen set downwards: the parts of a frozen space are frozen."""
        stack = [r for r in list(self.frozen) if r in self.definition]
        seen = set()
        while stack:
            r = self.find(stack.pop())
            if r in seen:
                continue
            seen.add(r)
            reason = self.frozen[r]
            for p in self.definition.get(r, (None, []))[1]:
                self.freeze(p, reason)
                stack.append(p)
        for root in list(self.definition):  # a definition that reaches itself can't be sliced
            if self.find(root) == root and self._cyclic(root, set()):
                for atom in self.atoms(root, guard=True):
                    self.freeze(atom, "cyclic channel layout")
                self.definition.pop(root)  # keep what remains walkable
                self.frozen[root] = "cyclic channel layout"

    def _cyclic(self, r, path) -> bool:
        if r in path:
            return True
        kind_parts = self.definition.get(r)
        if kind_parts is None:
            return False
        return any(self._cyclic(self.find(p), path | {r}) for p in kind_parts[1])

    def atoms(self, i: int, guard: bool = False, _path=()) -> list[int]:
        """The atoms that make up space i, in layout order (with repeats)."""
        r = self.find(i)
        if r not in self.definition or (guard and r in _path):
            return [r]
        return [a for p in self.definition[r][1] for a in self.atoms(p, guard, _path + (r,))]

    def is_frozen(self, i: int) -> bool:
        return self.find(i) in self.frozen

    def reason(self, i: int) -> str | None:
        return self.frozen.get(self.find(i))

    def new_size(self, i: int, sizes: dict):
        """The size of space i when each atom a has size sizes.get(a, its own)."""
        r = self.find(i)
        if r not in self.definition:
            return sizes.get(r, self.size[r])
        kind, parts = self.definition[r]
        values = [self.new_size(p, sizes) for p in parts]
        return sum(values) if kind == CAT else _product(values)

    def coords(self, i: int) -> list[tuple[int, np.ndarray]]:
        """For each atom occurrence in space i: the atom index at every position
        of i (-1 where that occurrence does not cover the position)."""
        r = self.find(i)
        n = self.size[r]
        if r not in self.definition:
            return [(r, np.arange(n))]
        kind, parts = self.definition[r]
        out = []
        if kind == CAT:
            start = 0
            for p in parts:
                m = self.size[self.find(p)]
                for atom, c in self.coords(p):
                    full = np.full(n, -1)
                    full[start:start + m] = c
                    out.append((atom, full))
                start += m
        else:
            inner = n
            pos = np.arange(n)
            for p in parts:
                m = self.size[self.find(p)]
                inner //= m
                index = (pos // inner) % m
                out += [(atom, c[index]) for atom, c in self.coords(p)]
        return out

    def multiplicity(self, i: int, atom: int, free=frozenset()) -> int:
        """How many positions of space i one element of `atom` stands for,
        counting only the factors that stay whole: 1 for a plain channel,
        head_dim for a head of a heads x head_dim space when head_dim is not
        in `free` (atoms that may shrink count 1); 0 when atom is not in i."""
        r, atom = self.find(i), self.find(atom)
        if r == atom:
            return 1
        if r not in self.definition:
            return 0
        kind, parts = self.definition[r]
        total = 0
        for k, p in enumerate(parts):
            m = self.multiplicity(p, atom, free)
            if m and kind == PROD:
                m *= _product(self._whole(q, free) for j, q in enumerate(parts) if j != k)
            total += m
        return total

    def _whole(self, i: int, free) -> int:
        """The size of space i if none of its atoms may shrink, else 1."""
        return 1 if any(a in free for a in self.atoms(i)) else self.size[self.find(i)]

    def kept_positions(self, i: int, keep: dict) -> np.ndarray:
        """Boolean mask over the positions of space i that survive `keep`
        (atom -> kept indices; atoms not in keep keep everything)."""
        mask = np.ones(self.size[self.find(i)], dtype=bool)
        for atom, c in self.coords(i):
            if atom in keep:
                mask &= (c < 0) | np.isin(c, keep[atom])
        return mask
