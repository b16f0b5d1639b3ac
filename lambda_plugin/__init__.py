from .bot import LambdaBot

__all__ = ["LambdaBot"]
