"""Active learning over the latent box: batch acquisition and (later) the campaign loop."""
