# Tiny stereosd stand-in (protocol.md section 2): one JSON request per line on stdin, one
# JSON reply per line on stdout; busybox nc runs one copy per TCP connection on port 1024.
# Requests are really carried out under /run/agent, which the power-off path copies to the
# data disk, so host tests can check the effect and not just the reply.

BEGIN { HEX = "0123456789abcdef" }

# Value of the string member `key` of a flat JSON object, unescaped; FOUND says if present.
# An unescaped `"key"` cannot occur inside a JSON string, so the first match is the member.
function jstr(s, key,    i, c, out, cp, lo) {
	FOUND = match(s, "\"" key "\"[ \t]*:[ \t]*\"")
	if (!FOUND) return ""
	out = ""
	for (i = RSTART + RLENGTH; i <= length(s); i++) {
		c = substr(s, i, 1)
		if (c == "\"") return out
		if (c != "\\") { out = out c; continue }
		c = substr(s, ++i, 1)
		if (c == "n") out = out "\n"
		else if (c == "t") out = out "\t"
		else if (c == "r") out = out "\r"
		else if (c == "b") out = out "\b"
		else if (c == "f") out = out "\f"
		else if (c != "u") out = out c
		else {
			cp = hex(substr(s, i + 1, 4)); i += 4
			if (cp >= 55296 && cp < 56320 && substr(s, i + 1, 2) == "\\u") {
				lo = hex(substr(s, i + 3, 4)); i += 6
				cp = 65536 + (cp - 55296) * 1024 + (lo - 56320)
			}
			out = out utf8(cp)
		}
	}
	FOUND = 0  # unterminated string: treat as absent
	return ""
}

function jnum(s, key) {
	if (!match(s, "\"" key "\"[ \t]*:[ \t]*[0-9]+")) return ""
	s = substr(s, RSTART, RLENGTH)
	sub(/.*:[ \t]*/, "", s)
	return s + 0
}

function jbool(s, key) { return match(s, "\"" key "\"[ \t]*:[ \t]*true") ? "true" : "false" }

function hex(h,    n, k) {
	n = 0
	for (k = 1; k <= length(h); k++) n = n * 16 + index(HEX, tolower(substr(h, k, 1))) - 1
	return n
}

function utf8(cp) {
	if (cp < 128) return sprintf("%c", cp)
	if (cp < 2048) return sprintf("%c%c", 192 + int(cp / 64), 128 + cp % 64)
	if (cp < 65536) return sprintf("%c%c%c", 224 + int(cp / 4096), 128 + int(cp / 64) % 64, 128 + cp % 64)
	return sprintf("%c%c%c%c", 240 + int(cp / 262144), 128 + int(cp / 4096) % 64, 128 + int(cp / 64) % 64, 128 + cp % 64)
}

function jesc(s) {
	gsub(/\\/, "\\\\", s)
	gsub(/"/, "\\\"", s)
	gsub(/\n/, "\\n", s)
	return s
}

function reply(line) { print line; fflush() }

function ack(type, err) {
	if (err == "") reply("{\"type\":\"ack\",\"payload\":{\"reply_to\":\"" jesc(type) "\",\"ok\":true}}")
	else reply("{\"type\":\"ack\",\"payload\":{\"reply_to\":\"" jesc(type) "\",\"ok\":false,\"error\":\"" jesc(err) "\"}}")
}

# Names become path components and reach the shell: allow only a safe alphabet.
function safe(name) { return name ~ /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/ }

function uptime(    line, f) {
	getline line < "/proc/uptime"
	close("/proc/uptime")
	split(line, f, " ")
	return int(f[1])
}

function ready(    x, r) {
	r = (getline x < "/run/tinyguest-ready") >= 0
	close("/run/tinyguest-ready")
	return r
}

function write(path, content) {
	printf "%s", content > path
	close(path)
}

{
	type = jstr($0, "type")
	if (type == "ping") reply("{\"type\":\"pong\"}")
	else if (type == "get_health")
		reply("{\"type\":\"health\",\"payload\":{\"state\":\"" (ready() ? "ready" : "booting") "\",\"agents\":[],\"uptime_seconds\":" uptime() "}}")
	else if (type == "set_config") {
		content = jstr($0, "content")
		if (!FOUND) ack(type, "missing content")
		else { write("/run/agent/config.toml", content); ack(type, "") }
	} else if (type == "inject_ssh_key") {
		user = jstr($0, "user"); key = jstr($0, "public_key")
		if (!safe(user)) ack(type, "bad user")
		else if (key == "") ack(type, "missing public_key")
		else {
			system("mkdir -p /run/agent/ssh/" user)
			path = "/run/agent/ssh/" user "/authorized_keys"
			print key >> path
			close(path)
			ack(type, "")
		}
	} else if (type == "inject_secret") {
		name = jstr($0, "name"); value = jstr($0, "value"); mode = jnum($0, "mode")
		if (!safe(name)) ack(type, "bad name")
		else {
			system("mkdir -p /run/agent/secrets")
			path = "/run/agent/secrets/" name
			write(path, value)
			# Not system()'s status: nc -ll leaves SIGCHLD ignored from the second
			# connection on, so wait() fails and system() says -1 for a chmod that worked.
			cmd = "chmod " sprintf("%o", mode == "" ? 384 : mode) " " path " && echo ok"
			done = ""; cmd | getline done; close(cmd)
			if (done == "ok") ack(type, "")
			else ack(type, "chmod failed")
		}
	} else if (type == "mount") {
		# This kernel has no 9p: the request is recorded, not performed.
		path = "/run/agent/mounts"
		print jstr($0, "tag") " " jstr($0, "guest_path") " " jstr($0, "fs_type") " " jbool($0, "read_only") >> path
		close(path)
		ack(type, "")
	} else if (type == "shutdown") {
		ack(type, "")
		system("/etc/tinyguest/poweroff")
	} else ack(type, "unknown request type")
}
