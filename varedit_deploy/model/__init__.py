"""The PyTorch reference of VAREdit inference: transformer, BSQ-VAE, T5 text path, sampler, edit loop.

Written once and used three ways: eagerly (parity with the official fixtures), traced by
`varedit_deploy.export`, and run by GPU backends.
"""
