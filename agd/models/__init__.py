"""Models: band-gap oracles, the composition autoencoder and the composition GAN."""
