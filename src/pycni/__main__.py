from .plugin import main

main()
