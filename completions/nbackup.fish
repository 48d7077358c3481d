# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_nbackup_global_optspecs
    string join \n h/help V/version
end

function __fish_nbackup_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_nbackup_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_nbackup_using_subcommand
    set -l cmd (__fish_nbackup_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c nbackup -n "__fish_nbackup_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c nbackup -n "__fish_nbackup_needs_command" -s V -l version -d 'Print version'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "cert" -d 'Certificates: create a CA, issue, mint enrollment tokens, list, renew, revoke'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "setup" -d 'Set up this host: a wizard for a server, an agent or both (or --answers FILE); `setup agent` enrolls an agent with a token from `nbackup cert token`'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "server" -d 'Run the server in the foreground until Ctrl-C / SIGTERM'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "agent" -d 'Run the agent daemon in the foreground: schedules, control channel, admin API'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "backup" -d 'Run backup entries once and exit'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "health" -d 'Ask the server for its status, version and free space per storage'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "list" -d 'List this agent\'s archives on the server'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "ls" -d 'List the files in one archive (from its catalog, without reading the archive)'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "restore" -d 'Restore files from an archive, verified against its manifest'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "verify" -d 'Ask the server to verify one of this agent\'s archives now'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "ctl" -d 'Query and command the daemons running here through their admin API'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "console" -d 'The operator console: live sessions, agents, freshness, history and actions'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "demo" -d 'Back up, verify and restore a tree over loopback with a throwaway PKI and server'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "completions" -d 'Print a shell completion script'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "man" -d 'Write man pages into a directory'
complete -c nbackup -n "__fish_nbackup_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and not __fish_seen_subcommand_from init-ca issue token list revoke renew help" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and not __fish_seen_subcommand_from init-ca issue token list revoke renew help" -f -a "init-ca" -d 'Create a new CA: DIR/ca.crt and DIR/ca.key (ECDSA P-256)'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and not __fish_seen_subcommand_from init-ca issue token list revoke renew help" -f -a "issue" -d 'Issue a certificate signed by the CA: PREFIX.crt and PREFIX.key'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and not __fish_seen_subcommand_from init-ca issue token list revoke renew help" -f -a "token" -d 'Mint a one-time enrollment token for an agent and print the command that enrolls it (server, with `enrollment` configured; the server must be running)'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and not __fish_seen_subcommand_from init-ca issue token list revoke renew help" -f -a "list" -d 'List certificates and when they end: a config\'s own (and, for a server, every certificate it issued or revoked), or PEM files'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and not __fish_seen_subcommand_from init-ca issue token list revoke renew help" -f -a "revoke" -d 'Revoke certificates; the server refuses them from the next handshake on'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and not __fish_seen_subcommand_from init-ca issue token list revoke renew help" -f -a "renew" -d 'Renew this agent\'s certificate now over mutual TLS (the agent daemon renews on its own within tls.renew_before of the end)'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and not __fish_seen_subcommand_from init-ca issue token list revoke renew help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from init-ca" -l out -d 'Directory to write ca.crt and ca.key into' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from init-ca" -l name -d 'Common name of the CA' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from init-ca" -l days -d 'Validity in days' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from init-ca" -l force -d 'Overwrite existing files'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from init-ca" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from issue" -l ca -d 'Directory holding ca.crt and ca.key' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from issue" -l server -d 'Server certificate for this DNS name or IP address (repeatable)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from issue" -l agent -d 'Agent certificate for this agent name (must equal agent.name in its config)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from issue" -l out -d 'Path prefix of the files to write (PREFIX.crt, PREFIX.key)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from issue" -l days -d 'Validity in days' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from issue" -l force -d 'Overwrite existing files'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from issue" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from token" -s c -l config -d 'Server configuration file (its admin socket is used)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from token" -l agent -d 'The agent\'s name, as its certificate will carry it' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from token" -l ttl -d 'How long the token lives (default: enrollment.token_ttl; at most 7d)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from token" -l address -d 'HOST:PORT the agent dials (default: enrollment.address, else the server certificate\'s first name and the listening port)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from token" -l json -d 'Print JSON'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from token" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from list" -s c -l config -d 'Agent or server configuration file' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from list" -l json -d 'Print JSON'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from revoke" -s c -l config -d 'Server configuration file (its admin socket is used)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from revoke" -l agent -d 'Every unexpired certificate the server issued to this agent' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from revoke" -l serial -d 'The certificate with this serial (hex, colons allowed)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from revoke" -l cert -d 'The certificate in this PEM file' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from revoke" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from renew" -s c -l config -d 'Agent configuration file' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from renew" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from help" -f -a "init-ca" -d 'Create a new CA: DIR/ca.crt and DIR/ca.key (ECDSA P-256)'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from help" -f -a "issue" -d 'Issue a certificate signed by the CA: PREFIX.crt and PREFIX.key'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from help" -f -a "token" -d 'Mint a one-time enrollment token for an agent and print the command that enrolls it (server, with `enrollment` configured; the server must be running)'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from help" -f -a "list" -d 'List certificates and when they end: a config\'s own (and, for a server, every certificate it issued or revoked), or PEM files'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from help" -f -a "revoke" -d 'Revoke certificates; the server refuses them from the next handshake on'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from help" -f -a "renew" -d 'Renew this agent\'s certificate now over mutual TLS (the agent daemon renews on its own within tls.renew_before of the end)'
complete -c nbackup -n "__fish_nbackup_using_subcommand cert; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and not __fish_seen_subcommand_from agent help" -l answers -d 'Take every answer from this file instead of asking (see --print-answers)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and not __fish_seen_subcommand_from agent help" -l dir -d 'Where the wizard writes configs and certificates (an answers file names its own)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and not __fish_seen_subcommand_from agent help" -l dry-run -d 'Show what would be done (certificates, files, diffs) and change nothing'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and not __fish_seen_subcommand_from agent help" -l print-answers -d 'Print a commented answers file with every question and its default'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and not __fish_seen_subcommand_from agent help" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and not __fish_seen_subcommand_from agent help" -f -a "agent" -d 'Enroll this host as an agent: make its key here, check the server\'s CA against the pin, obtain a certificate with the token, and write ca.crt, agent.crt, agent.key and a working agent.yaml into --dir'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and not __fish_seen_subcommand_from agent help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l server -d 'HOST:PORT of the server, as `nbackup cert token` printed it' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l token -d 'The one-time token' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l ca-pin -d 'The server CA\'s pin: sha256:HEX' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l name -d 'This agent\'s name (default: the host name up to its first dot)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l server-name -d 'Name in the server certificate, when it is not the host of --server' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l dir -d 'Directory to write into' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l path -d 'Source of the first backup entry in a new agent.yaml (repeatable)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l storage -d 'Storage of that entry (default: the server\'s first)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l schedule -d 'Schedule of that entry (cron, server-local time of this host)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -l force -d 'Replace an existing key and certificate (re-enrollment); agent.yaml is never overwritten'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from agent" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from help" -f -a "agent" -d 'Enroll this host as an agent: make its key here, check the server\'s CA against the pin, obtain a certificate with the token, and write ca.crt, agent.crt, agent.key and a working agent.yaml into --dir'
complete -c nbackup -n "__fish_nbackup_using_subcommand setup; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nbackup -n "__fish_nbackup_using_subcommand server" -s c -l config -d 'Server configuration file' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand server" -l no-admin -d 'Do not serve the local admin API'
complete -c nbackup -n "__fish_nbackup_using_subcommand server" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand agent" -s c -l config -d 'Agent configuration file' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand agent" -l no-admin -d 'Do not serve the local admin API'
complete -c nbackup -n "__fish_nbackup_using_subcommand agent" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand backup" -s c -l config -d 'Agent configuration file' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand backup" -s e -l entry -d 'Run only this entry (repeatable; default: all entries)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand backup" -l progress -d 'Show a progress bar'
complete -c nbackup -n "__fish_nbackup_using_subcommand backup" -l json -d 'Print one JSON object per entry on standard output'
complete -c nbackup -n "__fish_nbackup_using_subcommand backup" -s v -l verbose -d 'More log output on standard error (-v info, -vv debug)'
complete -c nbackup -n "__fish_nbackup_using_subcommand backup" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand health" -s c -l config -d 'Agent configuration file (for the server address and certificates)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand health" -l json -d 'Print JSON'
complete -c nbackup -n "__fish_nbackup_using_subcommand health" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand list" -s c -l config -d 'Agent configuration file (server address, certificates, entries)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand list" -s e -l entry -d 'Only this entry\'s archives' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand list" -l json -d 'Print JSON'
complete -c nbackup -n "__fish_nbackup_using_subcommand list" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ls" -s c -l config -d 'Agent configuration file (server address, certificates, entries)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ls" -s e -l entry -d 'The backup entry' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ls" -l at -d '`latest`, an archive name from `nbackup list`, or a time (`2026-12-01`, `"2026-12-01 14:30"`, RFC 3339): the newest archive finished by then' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ls" -l json -d 'Print JSON (one array of members)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ls" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -s c -l config -d 'Agent configuration file (server address, certificates, entries)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -s e -l entry -d 'The backup entry' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -l at -d '`latest`, an archive name from `nbackup list`, or a time (`2026-12-01`, `"2026-12-01 14:30"`, RFC 3339): the newest archive finished by then' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -l to -d 'Destination directory (created if missing); members land below it by their stored path (`/etc/hosts` → DIR/etc/hosts)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -l overwrite -d 'What to do with files that already exist' -r -f -a "never\t'Keep existing files; report them as not restored'
older\t'Replace existing files older than the archived ones'
always\t'Replace existing files'"
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -l dry-run -d 'Print what would be written, write nothing (from the catalog when the archive has one: nothing is downloaded)'
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -l progress -d 'Show a progress bar'
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -l json -d 'Print the result as JSON'
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -s v -l verbose -d 'More log output on standard error (-v info, -vv debug)'
complete -c nbackup -n "__fish_nbackup_using_subcommand restore" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c nbackup -n "__fish_nbackup_using_subcommand verify" -s c -l config -d 'Agent configuration file (server address, certificates, entries)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand verify" -s e -l entry -d 'The backup entry' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand verify" -l at -d '`latest`, an archive name from `nbackup list`, or a time (`2026-12-01`, `"2026-12-01 14:30"`, RFC 3339): the newest archive finished by then' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand verify" -l restore-test -d 'Also restore this many random files of the archive into a temporary directory and compare them with the live source (files changed since the backup are reported, not failures)' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand verify" -l json -d 'Print JSON'
complete -c nbackup -n "__fish_nbackup_using_subcommand verify" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "status" -d 'Status of the daemon'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "sessions" -d 'Sessions in progress, with their streams (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "agents" -d 'Agents known from their control channels (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "entries" -d 'Backup entries with schedule, next run and last result (agent)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "history" -d 'Finished sessions, newest first (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "events" -d 'Recorded events'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "archives" -d 'Archives on the server'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "abort" -d 'Abort a session (server: SESSION id, or AGENT/ENTRY via the control channel) or an entry\'s running backup (agent: ENTRY)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "rotate" -d 'Close one stream of a session; the agent re-joins it and resends (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "run" -d 'Run an entry now (agent: ENTRY; server: AGENT/ENTRY via the control channel)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "defer" -d 'Postpone an entry\'s next scheduled run (agent: ENTRY; server: AGENT/ENTRY)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "verify" -d 'Re-read stored archives against their manifests; a corrupt one is quarantined (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "sync" -d 'Copy to buckets what they lack: archives committed before a bucket was configured, or whose off-site state was lost; ones already in the bucket are verified, not uploaded again (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "notify-test" -d 'Send a test message to one of the daemon\'s `notify:` targets'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "reload" -d 'Re-read the daemon\'s configuration'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "metrics" -d 'Prometheus metrics (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and not __fish_seen_subcommand_from status sessions agents entries history events archives abort rotate run defer verify sync notify-test reload metrics help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from status" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from status" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from status" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from sessions" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from sessions" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from sessions" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from agents" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from agents" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from agents" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from entries" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from entries" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from entries" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from history" -l agent -d 'Only this agent\'s' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from history" -l limit -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from history" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from history" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from history" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from events" -l since -d 'Only events numbered above this' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from events" -l limit -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from events" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from events" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from events" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from archives" -l agent -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from archives" -l backup -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from archives" -l storage -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from archives" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from archives" -l buckets -d 'Also those only the storages\' buckets hold (lists each entry in each bucket)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from archives" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from archives" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from abort" -l reason -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from abort" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from abort" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from abort" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from rotate" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from rotate" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from rotate" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from run" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from run" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from run" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from defer" -l seconds -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from defer" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from defer" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from defer" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from verify" -l storage -d 'Only this storage' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from verify" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from verify" -l all -d 'Every kept archive, not only each entry\'s newest'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from verify" -l wait -d 'Wait for the results and print them; exit 1 if any archive is corrupt or could not be verified'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from verify" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from verify" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from sync" -l bucket -d 'Only this bucket' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from sync" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from sync" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from sync" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from notify-test" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from notify-test" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from notify-test" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from reload" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from reload" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from reload" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from metrics" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from metrics" -l json -d 'Print JSON instead of tables'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from metrics" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "status" -d 'Status of the daemon'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "sessions" -d 'Sessions in progress, with their streams (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "agents" -d 'Agents known from their control channels (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "entries" -d 'Backup entries with schedule, next run and last result (agent)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "history" -d 'Finished sessions, newest first (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "events" -d 'Recorded events'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "archives" -d 'Archives on the server'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "abort" -d 'Abort a session (server: SESSION id, or AGENT/ENTRY via the control channel) or an entry\'s running backup (agent: ENTRY)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "rotate" -d 'Close one stream of a session; the agent re-joins it and resends (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "run" -d 'Run an entry now (agent: ENTRY; server: AGENT/ENTRY via the control channel)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "defer" -d 'Postpone an entry\'s next scheduled run (agent: ENTRY; server: AGENT/ENTRY)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "verify" -d 'Re-read stored archives against their manifests; a corrupt one is quarantined (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "sync" -d 'Copy to buckets what they lack: archives committed before a bucket was configured, or whose off-site state was lost; ones already in the bucket are verified, not uploaded again (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "notify-test" -d 'Send a test message to one of the daemon\'s `notify:` targets'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "reload" -d 'Re-read the daemon\'s configuration'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "metrics" -d 'Prometheus metrics (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nbackup -n "__fish_nbackup_using_subcommand console" -l socket -d 'Admin socket (default: the one daemon running here)' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand console" -l size -d 'Size of the --dump frame' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand console" -l view -d 'The view to start on: overview, sessions, session (the first, opened), agents, archives, history, events' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand console" -l readonly -d 'Hide every action: look, do not touch'
complete -c nbackup -n "__fish_nbackup_using_subcommand console" -l no-color -d 'No colours (also when NO_COLOR is set); states stay words and glyphs'
complete -c nbackup -n "__fish_nbackup_using_subcommand console" -l dump -d 'Print one rendered frame as plain text and exit'
complete -c nbackup -n "__fish_nbackup_using_subcommand console" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand demo" -l keep -d 'Keep the PKI, configs, archive and restore in this directory instead of deleting them' -r -F
complete -c nbackup -n "__fish_nbackup_using_subcommand demo" -l compression -d 'Compression of the demo storage' -r -f -a "gzip\t''
zstd\t''"
complete -c nbackup -n "__fish_nbackup_using_subcommand demo" -l parallels -d 'Parallel streams' -r
complete -c nbackup -n "__fish_nbackup_using_subcommand demo" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand completions" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand man" -s h -l help -d 'Print help'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "cert" -d 'Certificates: create a CA, issue, mint enrollment tokens, list, renew, revoke'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "setup" -d 'Set up this host: a wizard for a server, an agent or both (or --answers FILE); `setup agent` enrolls an agent with a token from `nbackup cert token`'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "server" -d 'Run the server in the foreground until Ctrl-C / SIGTERM'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "agent" -d 'Run the agent daemon in the foreground: schedules, control channel, admin API'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "backup" -d 'Run backup entries once and exit'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "health" -d 'Ask the server for its status, version and free space per storage'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "list" -d 'List this agent\'s archives on the server'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "ls" -d 'List the files in one archive (from its catalog, without reading the archive)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "restore" -d 'Restore files from an archive, verified against its manifest'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "verify" -d 'Ask the server to verify one of this agent\'s archives now'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "ctl" -d 'Query and command the daemons running here through their admin API'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "console" -d 'The operator console: live sessions, agents, freshness, history and actions'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "demo" -d 'Back up, verify and restore a tree over loopback with a throwaway PKI and server'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "completions" -d 'Print a shell completion script'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "man" -d 'Write man pages into a directory'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and not __fish_seen_subcommand_from cert setup server agent backup health list ls restore verify ctl console demo completions man help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from cert" -f -a "init-ca" -d 'Create a new CA: DIR/ca.crt and DIR/ca.key (ECDSA P-256)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from cert" -f -a "issue" -d 'Issue a certificate signed by the CA: PREFIX.crt and PREFIX.key'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from cert" -f -a "token" -d 'Mint a one-time enrollment token for an agent and print the command that enrolls it (server, with `enrollment` configured; the server must be running)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from cert" -f -a "list" -d 'List certificates and when they end: a config\'s own (and, for a server, every certificate it issued or revoked), or PEM files'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from cert" -f -a "revoke" -d 'Revoke certificates; the server refuses them from the next handshake on'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from cert" -f -a "renew" -d 'Renew this agent\'s certificate now over mutual TLS (the agent daemon renews on its own within tls.renew_before of the end)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from setup" -f -a "agent" -d 'Enroll this host as an agent: make its key here, check the server\'s CA against the pin, obtain a certificate with the token, and write ca.crt, agent.crt, agent.key and a working agent.yaml into --dir'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "status" -d 'Status of the daemon'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "sessions" -d 'Sessions in progress, with their streams (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "agents" -d 'Agents known from their control channels (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "entries" -d 'Backup entries with schedule, next run and last result (agent)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "history" -d 'Finished sessions, newest first (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "events" -d 'Recorded events'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "archives" -d 'Archives on the server'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "abort" -d 'Abort a session (server: SESSION id, or AGENT/ENTRY via the control channel) or an entry\'s running backup (agent: ENTRY)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "rotate" -d 'Close one stream of a session; the agent re-joins it and resends (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "run" -d 'Run an entry now (agent: ENTRY; server: AGENT/ENTRY via the control channel)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "defer" -d 'Postpone an entry\'s next scheduled run (agent: ENTRY; server: AGENT/ENTRY)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "verify" -d 'Re-read stored archives against their manifests; a corrupt one is quarantined (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "sync" -d 'Copy to buckets what they lack: archives committed before a bucket was configured, or whose off-site state was lost; ones already in the bucket are verified, not uploaded again (server)'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "notify-test" -d 'Send a test message to one of the daemon\'s `notify:` targets'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "reload" -d 'Re-read the daemon\'s configuration'
complete -c nbackup -n "__fish_nbackup_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "metrics" -d 'Prometheus metrics (server)'
