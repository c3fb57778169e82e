"""Keys and the transform they control: the secret key file (:mod:`.keyfile`), the block-wise pixel shuffle
in its exact forms -- one gather, space-to-depth + 1x1 permutation convolution, host-side numpy
(:mod:`.transform`) -- and folding it into a patchify first layer (:mod:`.fold`).  A key is known
outside this package only by its fingerprint (docs/design.md §1-§2)."""
