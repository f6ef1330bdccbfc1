def convert(ctx):
    return []
