"""Data: labelled datasets (Fashion-MNIST, ImageFolder trees, foolbox's photos) resized and expanded to the
model's [0, 1] RGB input (:mod:`.datasets`), image files (:mod:`.images`) and the sample photos that ship
with scikit-image (:mod:`.samples`)."""
