-- vsockmon.lua: Wireshark/tshark plugin that adds what the built-in vsock dissector lacks.
--
-- It wraps packet-vsock.c: the vsock link type's entry in the wtap_encap table is taken
-- over by this plugin, which first calls the built-in dissector (its tree and fields stay
-- as they are) and then adds the protocol "vsockmon": a stream index per connection,
-- correct names for the socket type (SEQPACKET) and the op (7 is CREDIT_REQUEST), flag
-- bits, client/server/direction, connection state, credit accounting, expert info (refused,
-- reset, zero credit, protocol violations, the kernel's tap-length bug), and hands payloads
-- to sub-dissectors: ttrpc (Kata agent, port 1024, reassembled across packets), HTTP, JSON,
-- sd_notify, text lines. (A postdissector would not do: on a first pass without a filter
-- Wireshark builds no protocol tree, so it could neither read the vsock fields nor tell a
-- vsock frame from another; the headers are read from the frame's bytes here instead.)
--
-- Install: `vsockmon wireshark install`, or copy this file into the personal Lua plugins
-- folder (tshark -G folders), or run `tshark -X lua_script:vsockmon.lua -r FILE`.
-- Documentation: docs/wireshark.md of the vsockmon project.
--
-- Stream numbering (identical to `vsockmon conns`): key = (virtio type, unordered pair of
-- (cid, port) endpoints). A REQUEST always starts a new stream for its key; any other
-- packet joins its key's current stream, or starts one. Streams are numbered 0, 1, 2... in
-- the order of their first frame. Everything is computed on a frame's first dissection
-- (frames come in order then) and cached by frame number, so later re-dissection in any
-- order shows the same values.

local VERSION = "0.1.0"

-- Loaded twice (installed in the personal plugins folder and named again with
-- `-X lua_script:`), the second Proto() would abort tshark ("there cannot be two protocols
-- with the same description"). All plugins share one Lua state, so the first copy leaves
-- its version in a global and a later copy steps aside, saying so when the versions differ.
local loaded = rawget(_G, "vsockmon_plugin_version")
if loaded then
    if loaded ~= VERSION then
        io.stderr:write("vsockmon.lua: version " .. loaded .. " is already loaded (installed,"
            .. " or named first); this copy, version " .. VERSION .. ", is not used\n")
    end
    return
end
rawset(_G, "vsockmon_plugin_version", VERSION)
if set_plugin_info then
    set_plugin_info({
        version = VERSION,
        description = "vsockmon: vsock streams, credit, expert info, payload dissectors",
        repository = "vsockmon (dissectors/vsockmon.lua)",
    })
end

local TWO32 = 4294967296
local TTRPC_HEADER = 10
local TTRPC_MAX = 4 * 1024 * 1024

-- BEGIN field tables: generated from vsockmon/wire/protocol.py by gen_lua_tables.py
local MON_HDR = { size = 32, fields = {
    src_cid = { 0, 8 },
    dst_cid = { 8, 8 },
    src_port = { 16, 4 },
    dst_port = { 20, 4 },
    op = { 24, 2 },
    transport = { 26, 2 },
    trans_len = { 28, 2 },
    reserved = { 30, 2 },
} }
local VIRTIO_HDR = { size = 44, fields = {
    src_cid = { 0, 8 },
    dst_cid = { 8, 8 },
    src_port = { 16, 4 },
    dst_port = { 20, 4 },
    len = { 24, 4 },
    type = { 28, 2 },
    op = { 30, 2 },
    flags = { 32, 4 },
    buf_alloc = { 36, 4 },
    fwd_cnt = { 40, 4 },
} }
local TRANSPORT = { UNKNOWN = 0, NO_INFO = 1, VIRTIO = 2 }
local OP = { INVALID = 0, REQUEST = 1, RESPONSE = 2, RST = 3, SHUTDOWN = 4, RW = 5, CREDIT_UPDATE = 6, CREDIT_REQUEST = 7 }
local OP_NAMES = { [0] = "INVALID", [1] = "REQUEST", [2] = "RESPONSE", [3] = "RST", [4] = "SHUTDOWN", [5] = "RW", [6] = "CREDIT_UPDATE", [7] = "CREDIT_REQUEST" }
local TYPE = { STREAM = 1, SEQPACKET = 2, DGRAM = 3 }
local TYPE_NAMES = { [1] = "STREAM", [2] = "SEQPACKET", [3] = "DGRAM" }
local SHUT = { RCV = 1, SEND = 2 }
local SEQ = { EOM = 1, EOR = 2 }
-- END field tables

local function name_of(names, v)
    return names[v] or string.format("UNKNOWN(%d)", v)
end

---------------------------------------------------------------------------------------
-- The vsockmon protocol and its fields
---------------------------------------------------------------------------------------

local vsm = Proto("vsockmon", "vsockmon analysis")

local F = {
    stream = ProtoField.uint32("vsockmon.stream", "Stream index"),
    type_name = ProtoField.string("vsockmon.type_name", "Socket type"),
    op_name = ProtoField.string("vsockmon.op_name", "Operation"),
    flags = ProtoField.uint32("vsockmon.flags", "Flags", base.HEX),
    shut_rcv = ProtoField.bool("vsockmon.flags.shut_rcv", "SHUTDOWN receive", 32, nil, SHUT.RCV),
    shut_send = ProtoField.bool("vsockmon.flags.shut_send", "SHUTDOWN send", 32, nil, SHUT.SEND),
    seq_eom = ProtoField.bool("vsockmon.flags.seq_eom", "End of message (EOM)", 32, nil, SEQ.EOM),
    seq_eor = ProtoField.bool("vsockmon.flags.seq_eor", "End of record (EOR)", 32, nil, SEQ.EOR),
    client = ProtoField.string("vsockmon.client", "Client (cid:port)"),
    server = ProtoField.string("vsockmon.server", "Server (cid:port)"),
    client_cid = ProtoField.uint32("vsockmon.client_cid", "Client CID"),
    client_port = ProtoField.uint32("vsockmon.client_port", "Client port"),
    server_cid = ProtoField.uint32("vsockmon.server_cid", "Server CID"),
    server_port = ProtoField.uint32("vsockmon.server_port", "Server port"),
    dir = ProtoField.string("vsockmon.dir", "Direction (c2s: client to server, s2c)"),
    state = ProtoField.string("vsockmon.state", "Connection state after this packet"),
    request_in = ProtoField.framenum("vsockmon.request_in", "Request in frame", base.NONE,
                                     frametype.REQUEST),
    handshake = ProtoField.double("vsockmon.handshake_time", "Time since request (s)"),
    len = ProtoField.uint32("vsockmon.len", "Payload length (header len)"),
    captured = ProtoField.uint32("vsockmon.captured_len", "Captured payload length"),
    seq = ProtoField.uint32("vsockmon.seq", "Relative sequence (first byte)"),
    next_seq = ProtoField.uint32("vsockmon.next_seq", "Next relative sequence"),
    in_flight = ProtoField.uint32("vsockmon.in_flight", "Sender's bytes in flight"),
    credit = ProtoField.uint32("vsockmon.credit", "Sender's remaining credit"),
    payload_proto = ProtoField.string("vsockmon.payload_proto", "Payload protocol"),
    reassembled_in = ProtoField.framenum("vsockmon.reassembled_in", "Reassembled in frame"),
    segment = ProtoField.bytes("vsockmon.segment", "Message segment"),
    segments = ProtoField.string("vsockmon.segments", "Message reassembled from frames"),
}
vsm.fields = {}
for _, field in pairs(F) do table.insert(vsm.fields, field) end

local E = {
    refused = ProtoExpert.new("vsockmon.refused", "Connection refused: REQUEST answered by RST",
                              expert.group.SEQUENCE, expert.severity.WARN),
    reset = ProtoExpert.new("vsockmon.reset", "Connection reset without SHUTDOWN",
                            expert.group.SEQUENCE, expert.severity.WARN),
    closed = ProtoExpert.new("vsockmon.closed", "Connection closed by RST after SHUTDOWN",
                             expert.group.SEQUENCE, expert.severity.CHAT),
    dup_request = ProtoExpert.new("vsockmon.dup_request",
                                  "REQUEST on an address pair that is already connected",
                                  expert.group.SEQUENCE, expert.severity.WARN),
    zero_credit = ProtoExpert.new("vsockmon.zero_credit",
                                  "Zero credit: bytes in flight reach the peer's buf_alloc",
                                  expert.group.SEQUENCE, expert.severity.WARN),
    before_response = ProtoExpert.new("vsockmon.before_response",
                                      "Data before the connection was accepted",
                                      expert.group.PROTOCOL, expert.severity.ERROR),
    beyond_credit = ProtoExpert.new("vsockmon.beyond_credit", "Data beyond the peer's credit",
                                    expert.group.PROTOCOL, expert.severity.ERROR),
    after_shutdown = ProtoExpert.new("vsockmon.after_shutdown", "Data after SHUTDOWN SEND",
                                     expert.group.PROTOCOL, expert.severity.ERROR),
    payload_len = ProtoExpert.new("vsockmon.payload_len",
                                  "Captured payload length differs from header len",
                                  expert.group.PROTOCOL, expert.severity.WARN),
    framing = ProtoExpert.new("vsockmon.framing_lost", "Payload framing lost",
                              expert.group.MALFORMED, expert.severity.WARN),
    -- Findings of `vsockmon diagnose`, read from the comments `vsockmon export` writes.
    diagnose_error = ProtoExpert.new("vsockmon.diagnose.error", "vsockmon diagnose: error",
                                     expert.group.SEQUENCE, expert.severity.ERROR),
    diagnose_warning = ProtoExpert.new("vsockmon.diagnose.warning",
                                       "vsockmon diagnose: warning",
                                       expert.group.SEQUENCE, expert.severity.WARN),
    diagnose_info = ProtoExpert.new("vsockmon.diagnose.info", "vsockmon diagnose: note",
                                    expert.group.SEQUENCE, expert.severity.NOTE),
}
vsm.experts = {}
for _, e in pairs(E) do table.insert(vsm.experts, e) end

vsm.prefs.rewrite_info = Pref.bool("Rewrite the Info column", true,
    "Replace the vsock Info text by stream, addresses, correct names and payload summary")

-- A header field's value from the frame (little-endian, as the field table says).
local function field(tvb, base, hdr, name)
    local spec = hdr.fields[name]
    local r = tvb(base + spec[1], spec[2])
    if spec[2] == 8 then return r:le_uint64():tonumber() end
    return r:le_uint()
end

local function has(flags, bit)
    return bit32.band(flags, bit) ~= 0
end

---------------------------------------------------------------------------------------
-- Sub-protocols: ttrpc and sd_notify, plus the port table
---------------------------------------------------------------------------------------

local ttrpc = Proto("ttrpc", "ttrpc (Kata Containers agent RPC)")
local GRPC_CODES = { [0] = "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED" }
local TTRPC_TYPES = { "Request", "Response", "Data" }
local T = {
    length = ProtoField.uint32("ttrpc.length", "Length"),
    stream_id = ProtoField.uint32("ttrpc.stream_id", "Stream ID"),
    type = ProtoField.uint8("ttrpc.type", "Type", base.DEC, TTRPC_TYPES),
    flags = ProtoField.uint8("ttrpc.flags", "Flags", base.HEX),
    remote_closed = ProtoField.bool("ttrpc.flags.remote_closed", "Remote closed", 8, nil, 0x1),
    remote_open = ProtoField.bool("ttrpc.flags.remote_open", "Remote open", 8, nil, 0x2),
    no_data = ProtoField.bool("ttrpc.flags.no_data", "No data", 8, nil, 0x4),
    service = ProtoField.string("ttrpc.service", "Service"),
    method = ProtoField.string("ttrpc.method", "Method (service/method)"),
    timeout = ProtoField.uint64("ttrpc.timeout_ns", "Timeout (ns)"),
    md_key = ProtoField.string("ttrpc.metadata.key", "Metadata key"),
    md_value = ProtoField.string("ttrpc.metadata.value", "Metadata value"),
    payload = ProtoField.bytes("ttrpc.payload", "Payload"),
    code = ProtoField.int32("ttrpc.status.code", "Status code", base.DEC, GRPC_CODES),
    message = ProtoField.string("ttrpc.status.message", "Status message"),
    request_in = ProtoField.framenum("ttrpc.request_in", "Request in frame", base.NONE,
                                     frametype.REQUEST),
    data = ProtoField.bytes("ttrpc.data", "Data"),
}
ttrpc.fields = {}
for _, field in pairs(T) do table.insert(ttrpc.fields, field) end
local E_ttrpc_partial = ProtoExpert.new("ttrpc.partial", "ttrpc message continues in later packets",
                                        expert.group.REASSEMBLE, expert.severity.NOTE)
local E_ttrpc_malformed = ProtoExpert.new("ttrpc.malformed", "Malformed ttrpc protobuf body",
                                          expert.group.MALFORMED, expert.severity.WARN)
ttrpc.experts = { E_ttrpc_partial, E_ttrpc_malformed }

local sdn = Proto("sd_notify", "systemd sd_notify")
local S = {
    line = ProtoField.string("sd_notify.line", "Assignment"),
    key = ProtoField.string("sd_notify.key", "Key"),
    value = ProtoField.string("sd_notify.value", "Value"),
}
sdn.fields = { S.line, S.key, S.value }

-- Port table: dissectors for payloads by the server's port (then the client's). Other Lua
-- plugins may add to it: DissectorTable.get("vsockmon.port"):add(5000, my_proto)
local port_table = DissectorTable.new("vsockmon.port", "vsock port (vsockmon)", ftypes.UINT32,
                                      base.DEC, vsm)

-- Minimal protobuf wire decoding over a Lua string (1-based positions). Returns a list of
-- {num, wt, value, pos (of the value), len (of the value)} or nil, error.
local function pb_varint(s, pos)
    local value, mul = 0, 1
    for i = pos, math.min(#s, pos + 9) do
        local b = s:byte(i)
        value = value + (b % 128) * mul
        if b < 128 then return value, i + 1 end
        mul = mul * 128
    end
    return nil, "bad varint"
end

local function pb_fields(s)
    local out, pos = {}, 1
    while pos <= #s do
        local key, npos = pb_varint(s, pos)
        if key == nil then return out, "truncated key" end
        local fnum, wt = math.floor(key / 8), key % 8
        if fnum == 0 then return out, "field number 0" end
        local f = { num = fnum, wt = wt }
        if wt == 0 then
            local v, p2 = pb_varint(s, npos)
            if v == nil then return out, "truncated varint" end
            f.value, f.pos, f.len = v, npos, p2 - npos
            pos = p2
        elseif wt == 2 then
            local n, p2 = pb_varint(s, npos)
            if n == nil or p2 + n - 1 > #s then return out, "truncated length-delimited field" end
            f.value, f.pos, f.len = s:sub(p2, p2 + n - 1), p2, n
            pos = p2 + n
        elseif wt == 1 or wt == 5 then
            local w = (wt == 1) and 8 or 4
            if npos + w - 1 > #s then return out, "truncated fixed field" end
            f.value, f.pos, f.len = s:sub(npos, npos + w - 1), npos, w
            pos = npos + w
        else
            return out, "unsupported wire type " .. wt
        end
        table.insert(out, f)
    end
    return out, nil
end

local function pb_first(list, fnum)
    for _, f in ipairs(list) do
        if f.num == fnum then return f end
    end
    return nil
end

local function u32be(s, pos)
    local a, b, c, d = s:byte(pos, pos + 3)
    return ((a * 256 + b) * 256 + c) * 256 + d
end

-- A ttrpc header at pos of s: length, stream id, type, flags, or nil when not plausible.
local function ttrpc_header(s, pos)
    if #s - pos + 1 < TTRPC_HEADER then return nil end
    local length, mtype = u32be(s, pos), s:byte(pos + 8)
    if length > TTRPC_MAX or mtype < 1 or mtype > 3 then return nil end
    return length, u32be(s, pos + 4), mtype, s:byte(pos + 9)
end

-- service/method of a request body (a Lua string), or nil.
local function ttrpc_method(body)
    local list = pb_fields(body)
    local svc, m = pb_first(list, 1), pb_first(list, 2)
    if svc and m and svc.wt == 2 and m.wt == 2 then return svc.value .. "/" .. m.value end
    return nil
end

-- Strict heuristic: complete messages that tile the payload exactly; requests name a method.
local function ttrpc_detect(s)
    local pos, count = 1, 0
    while pos <= #s do
        local length, _, mtype = ttrpc_header(s, pos)
        if length == nil or pos + TTRPC_HEADER + length - 1 > #s then return false end
        local body = s:sub(pos + TTRPC_HEADER, pos + TTRPC_HEADER + length - 1)
        if mtype == 1 and ttrpc_method(body) == nil then return false end
        pos, count = pos + TTRPC_HEADER + length, count + 1
    end
    return count > 0
end

-- Dissect ttrpc messages in tvb. match: optional {stream_id -> {method, frame}} found in
-- the first pass for responses. Returns a one-line summary.
local function ttrpc_dissect(tvb, pinfo, tree, matches)
    local s = tvb:raw()
    local pos, parts = 1, {}
    while #s - pos + 1 >= TTRPC_HEADER do
        local length, sid, mtype, flags = ttrpc_header(s, pos)
        if length == nil then break end
        local avail = math.min(length, #s - pos + 1 - TTRPC_HEADER)
        local t = tree:add(ttrpc, tvb(pos - 1, TTRPC_HEADER + avail))
        local o = pos - 1
        t:add(T.length, tvb(o, 4))
        t:add(T.stream_id, tvb(o + 4, 4))
        t:add(T.type, tvb(o + 8, 1))
        local ft = t:add(T.flags, tvb(o + 9, 1))
        ft:add(T.remote_closed, tvb(o + 9, 1))
        ft:add(T.remote_open, tvb(o + 9, 1))
        ft:add(T.no_data, tvb(o + 9, 1))
        local body_off = o + TTRPC_HEADER
        local body = s:sub(pos + TTRPC_HEADER, pos + TTRPC_HEADER + avail - 1)
        local label = string.format("%s #%d", (TTRPC_TYPES[mtype] or "?"):lower(), sid)
        local list, err = pb_fields(body)
        local function add(field, f)
            return t:add(field, tvb(body_off + f.pos - 1, f.len))
        end
        if mtype == 1 then
            local svc, m = pb_first(list, 1), pb_first(list, 2)
            if svc and svc.wt == 2 then add(T.service, svc) end
            if svc and m and m.wt == 2 then
                local full = svc.value .. "/" .. m.value
                t:add(T.method, tvb(body_off + m.pos - 1, m.len), full)
                label = label .. " " .. full
            end
            for _, f in ipairs(list) do
                if f.num == 3 and f.wt == 2 and f.len > 0 then add(T.payload, f) end
                if f.num == 4 and f.wt == 0 then
                    t:add(T.timeout, tvb(body_off + f.pos - 1, f.len), UInt64.new(f.value))
                end
                if f.num == 5 and f.wt == 2 then
                    local kv = pb_fields(f.value)
                    local k, v = pb_first(kv, 1), pb_first(kv, 2)
                    if k then t:add(T.md_key, tvb(body_off + f.pos - 1, f.len), k.value) end
                    if v then t:add(T.md_value, tvb(body_off + f.pos - 1, f.len), v.value) end
                end
            end
        elseif mtype == 2 then
            local match = matches and matches[sid]
            if match then
                t:add(T.request_in, match.frame):set_generated()
                t:add(T.method, match.method):set_generated()
                label = label .. " " .. match.method
            end
            local code, msg = 0, nil
            local st = pb_first(list, 1)
            if st and st.wt == 2 then
                local inner = pb_fields(st.value)
                local c, m = pb_first(inner, 1), pb_first(inner, 2)
                if c and c.wt == 0 then
                    code = c.value
                    if code >= 2147483648 then code = (code % TWO32) - TWO32 end
                end
                if m and m.wt == 2 then msg = m.value end
            end
            if length == avail then
                t:add(T.code, code):set_generated()
                if msg then t:add(T.message, msg):set_generated() end
                label = label .. " " .. (GRPC_CODES[code] or ("CODE(" .. code .. ")"))
                if msg then label = label .. ": " .. msg end
            end
            local p = pb_first(list, 2)
            if p and p.wt == 2 and p.len > 0 then add(T.payload, p) end
        else
            if avail > 0 then t:add(T.data, tvb(body_off, avail)) end
            label = label .. string.format(" %d bytes", length)
        end
        if err and length == avail then
            t:add_proto_expert_info(E_ttrpc_malformed, "Malformed ttrpc body: " .. err)
            label = label .. " (malformed)"
        end
        if avail < length then
            t:add_proto_expert_info(E_ttrpc_partial, string.format(
                "ttrpc message: %d of %d body bytes here", avail, length))
            label = label .. string.format(" (partial, %d of %d bytes)", avail, length)
        end
        t:append_text(", " .. label)
        table.insert(parts, label)
        pos = pos + TTRPC_HEADER + avail
    end
    return table.concat(parts, "; ")
end

function ttrpc.dissector(tvb, pinfo, tree)
    local summary = ttrpc_dissect(tvb, pinfo, tree, nil)
    if summary == "" then return 0 end
    pinfo.cols.protocol:set("ttrpc")
    return tvb:len()
end
port_table:add(1024, ttrpc)

-- Valid UTF-8 (Lua 5.2 has no utf8 library): lead byte, then its continuation bytes.
local function utf8_valid(s)
    local i, n = 1, #s
    while i <= n do
        local c = s:byte(i)
        local extra = 0
        if c >= 0xF0 and c <= 0xF4 then extra = 3
        elseif c >= 0xE0 then extra = 2
        elseif c >= 0xC2 and c < 0xE0 then extra = 1
        elseif c >= 0x80 then return false end
        for j = i + 1, i + extra do
            local cc = s:byte(j)
            if cc == nil or cc < 0x80 or cc > 0xBF then return false end
        end
        i = i + extra + 1
    end
    return true
end

-- sd_notify: every non-empty line is KEY=VALUE with an upper-case key.
local function sd_notify_detect(s)
    if not utf8_valid(s) then return false end
    local n = 0
    for line in s:gmatch("[^\n]+") do
        line = line:gsub("\r$", "")
        if not line:match("^[A-Z][A-Z0-9_]*=[^%c]*$") then return false end
        n = n + 1
    end
    return n > 0
end

local function sd_notify_dissect(tvb, pinfo, tree)
    local s = tvb:raw()
    local t = tree:add(sdn, tvb())
    local parts, pos = {}, 1
    for line in s:gmatch("([^\n]*)\n?") do
        if pos > #s then break end
        local clean = line:gsub("\r$", "")
        if clean ~= "" then
            local item = t:add(S.line, tvb(pos - 1, #clean), clean)
            local k, v = clean:match("^([^=]+)=(.*)$")
            item:add(S.key, tvb(pos - 1, #k), k)
            item:add(S.value, tvb(pos + #k, #v), v)
            table.insert(parts, clean)
        end
        pos = pos + #line + 1
    end
    local summary = table.concat(parts, " ")
    t:append_text(": " .. summary)
    return summary
end

-- Printable text: UTF-8 without control bytes other than tab, CR and LF.
local function printable(s)
    return #s > 0 and not s:find("[%z\1-\8\11\12\14-\31\127]") and s:find("%S") ~= nil
        and utf8_valid(s)
end

local function http_detect(s)
    local line = s:match("^([^\r\n]*)\r?\n")
    if line == nil then return false end
    return line:match("^%u+ %S+ HTTP/1%.[01]$") ~= nil or line:match("^HTTP/1%.[01] %d%d%d") ~= nil
end

-- Heuristics tried in order when no port-table dissector claims a payload (the same order
-- as the Python registry: ttrpc, http, json, sd_notify, text).
local HEURISTICS = {
    { name = "ttrpc", detect = ttrpc_detect },
    { name = "http", detect = http_detect },
    { name = "json", detect = function(s) return s:match("^%s*[%[{]") ~= nil end },
    { name = "sd_notify", detect = sd_notify_detect },
    { name = "text", detect = printable },
}
local WS_DISSECTOR = { http = "http", json = "json", text = "data-text-lines" }

---------------------------------------------------------------------------------------
-- First pass: streams, state, credit, ttrpc reassembly (cached by frame number)
---------------------------------------------------------------------------------------

local current, streams, frames = {}, {}, {}

function vsm.init()
    current, streams, frames = {}, {}, {}
end

local function ep_less(c1, p1, c2, p2)
    return c1 < c2 or (c1 == c2 and p1 < p2)
end

-- One end of a stream. As a sender: bytes sent (RW len), the least sent-minus-consumed
-- seen (cmin), its last credit and whether it is stalled. As a receiver: what it
-- advertised, fwd_cnt unwrapped from u32 relative to its first advertisement.
local function new_side()
    return { sent = 0, cmin = nil, credit = nil, stalled = false, shut_send = false,
             shut_rcv = false, known = false, fwd_raw = 0, fwd_unw = 0, fwd_max = 0, buf = 0 }
end

local function new_stream(h)
    local s = { index = #streams, state = nil, shutdown = false,
                side = { c2s = new_side(), s2c = new_side() },
                reasm = {}, mode = {}, ttrpc_requests = {} }
    -- Who is the client: the REQUEST's sender; a RESPONSE's receiver; else the lower port
    -- is taken for the server (Linux binds clients to random ports >= 1024).
    local src_is_client
    if h.op == OP.REQUEST then
        src_is_client = true
    elseif h.op == OP.RESPONSE then
        src_is_client = false
    else
        src_is_client = h.src_port >= h.dst_port
    end
    if src_is_client then
        s.ccid, s.cport, s.scid, s.sport = h.src_cid, h.src_port, h.dst_cid, h.dst_port
    else
        s.ccid, s.cport, s.scid, s.sport = h.dst_cid, h.dst_port, h.src_cid, h.src_port
    end
    streams[#streams + 1] = s
    return s
end

local function expert_add(rec, which, text)
    rec.experts = rec.experts or {}
    table.insert(rec.experts, { which, text })
end

-- Credit, per direction: the sender may have at most the peer's buf_alloc bytes sent and
-- not consumed (fwd_cnt). Exactly as `vsockmon conns` counts it: fwd_cnt is unwrapped and
-- never moves back (a delayed packet may carry an older one), and bytes in flight are
-- sent - consumed minus the least such value seen, so a stream whose start was not captured
-- gets a lower bound (zero when first seen) and a REQUEST-started one the exact value.
local CREDIT_OPS = { [OP.REQUEST] = true, [OP.RESPONSE] = true, [OP.SHUTDOWN] = true,
                     [OP.RW] = true, [OP.CREDIT_UPDATE] = true, [OP.CREDIT_REQUEST] = true }

local function advertise(side, h)
    if side.known then
        local delta = (h.fwd_cnt - side.fwd_raw) % TWO32
        if delta >= TWO32 / 2 then delta = delta - TWO32 end
        side.fwd_unw = side.fwd_unw + delta
    end
    side.known, side.fwd_raw, side.buf = true, h.fwd_cnt, h.buf_alloc
    side.fwd_max = math.max(side.fwd_max, side.fwd_unw)
end

-- Bytes in flight and credit of `snd` towards `peer` after this packet, or nil.
local function credit_of(snd, peer)
    if not peer.known then return nil end
    local c = snd.sent - peer.fwd_max
    snd.cmin = math.min(snd.cmin or c, c)
    local flight = c - snd.cmin
    return flight, peer.buf - flight
end

local function account(s, rec, h, snd, rcv)
    if CREDIT_OPS[h.op] then advertise(snd, h) end
    if h.op == OP.RW then
        rec.seq, rec.next_seq = snd.sent, snd.sent + h.len
        if snd.shut_send then
            expert_add(rec, E.after_shutdown, string.format(
                "Data after SHUTDOWN SEND: %d bytes from a side that closed its sending direction",
                h.len))
        end
        if s.state == "REQUESTED" then
            expert_add(rec, E.before_response, "Data before the connection was accepted (RESPONSE)")
        end
        if snd.credit ~= nil and h.len > snd.credit then
            expert_add(rec, E.beyond_credit, string.format(
                "Data beyond credit: %d bytes sent, the peer had %d of its buf_alloc %d free",
                h.len, math.max(snd.credit, 0), rcv.buf))
        end
        snd.sent = snd.sent + h.len
    end
    for _, d in ipairs({ "c2s", "s2c" }) do
        local x, peer = s.side[d], s.side[d == "c2s" and "s2c" or "c2s"]
        local flight, credit = credit_of(x, peer)
        x.credit = credit
        local zero = credit ~= nil and credit <= 0
        if zero and not x.stalled then
            expert_add(rec, E.zero_credit, string.format(
                "Zero credit (%s): %d bytes in flight fill the peer's buf_alloc %d",
                d, flight, peer.buf))
        end
        x.stalled = zero
        if x == snd and flight ~= nil then rec.in_flight, rec.credit = flight, math.max(credit, 0) end
    end
end

local function transition(s, rec, h, from_client, ts, number)
    local snd = s.side[rec.dir]
    if h.op == OP.REQUEST then
        s.state, s.request_frame, s.request_ts = "REQUESTED", number, ts
    elseif h.op == OP.RESPONSE then
        if s.state == "REQUESTED" then
            rec.request_in, rec.handshake = s.request_frame, ts - s.request_ts
        end
        s.state = "ESTABLISHED"
    elseif h.op == OP.SHUTDOWN then
        snd.shut_rcv = snd.shut_rcv or has(h.flags, SHUT.RCV)
        snd.shut_send = snd.shut_send or has(h.flags, SHUT.SEND)
        s.shutdown, s.state = true, "CLOSING"
    elseif h.op == OP.RST then
        if s.state == "REQUESTED" and not from_client then
            rec.request_in, rec.handshake = s.request_frame, ts - s.request_ts
            expert_add(rec, E.refused, string.format(
                "Connection refused: REQUEST in frame %d answered by RST (nothing listens on %d:%d)",
                s.request_frame, s.scid, s.sport))
            s.state = "REFUSED"
        elseif s.state == "CLOSED" or s.state == "REFUSED" then -- luacheck: ignore 542
            -- a repeated RST (Linux sends two) says nothing new
        elseif s.shutdown then
            expert_add(rec, E.closed, "Connection closed by RST after SHUTDOWN")
            s.state = "CLOSED"
        else
            local unacked = ""
            if rec.in_flight ~= nil and rec.in_flight > 0 then
                unacked = string.format(" with %d unacknowledged bytes", rec.in_flight)
            end
            expert_add(rec, E.reset, "Connection reset without SHUTDOWN" .. unacked)
            s.state = "CLOSED"
        end
    elseif s.state == nil or s.state == "REQUESTED" then
        s.state = "ESTABLISHED"
    end
    rec.state = s.state
end

-- ttrpc reassembly across RW packets of one direction: messages wholly inside a packet are
-- dissected in place; one spanning packets is rebuilt and shown in its last packet.
local function ttrpc_feed(s, rec, dir, data, cut, number)
    local r = s.reasm[dir]
    if r == nil then
        r = { pieces = {}, have = 0, need = nil, start = nil, mids = {} }
        s.reasm[dir] = r
    end
    if r.broken then return end
    if cut then
        r.broken = true
        expert_add(rec, E.framing, "ttrpc framing lost: payload cut by the snap length")
        return
    end
    rec.ttrpc = { whole = {}, rebuilt = {} }
    local pos, n = 1, #data
    while pos <= n do
        if r.have > 0 then
            local target = r.need or TTRPC_HEADER
            local take = math.min(target - r.have, n - pos + 1)
            table.insert(r.pieces, data:sub(pos, pos + take - 1))
            r.have, pos = r.have + take, pos + take
            if r.need == nil and r.have == TTRPC_HEADER then
                local hdr = table.concat(r.pieces)
                local length = ttrpc_header(hdr, 1)
                if length == nil then r.broken = true break end
                r.need, r.pieces = TTRPC_HEADER + length, { hdr }
            end
            if r.need ~= nil and r.have == r.need then
                local parts = { r.start }
                for _, f in ipairs(r.mids) do table.insert(parts, f) end
                table.insert(parts, number)
                table.insert(rec.ttrpc.rebuilt, { bytes = table.concat(r.pieces),
                                                  frames = table.concat(parts, ",") })
                for _, f in ipairs(r.mids) do frames[f].reassembled_in = number end
                frames[r.start].reassembled_in = number
                r.pieces, r.have, r.need, r.mids = {}, 0, nil, {}
            end
        else
            local length = ttrpc_header(data, pos)
            if n - pos + 1 >= TTRPC_HEADER and length == nil then r.broken = true break end
            if length ~= nil and n - pos + 1 >= TTRPC_HEADER + length then
                table.insert(rec.ttrpc.whole, { off = pos - 1, len = TTRPC_HEADER + length })
                pos = pos + TTRPC_HEADER + length
            else
                rec.ttrpc.head = pos - 1
                r.pieces, r.have, r.start = { data:sub(pos) }, n - pos + 1, number
                r.need = length and (TTRPC_HEADER + length) or nil
                pos = n + 1
            end
        end
    end
    if r.broken then
        expert_add(rec, E.framing, "ttrpc framing lost: no valid header where one was due")
        rec.ttrpc = nil
        return
    end
    if r.have > 0 and r.start ~= number then table.insert(r.mids, number) end
    -- Requests remember their method so responses can name it.
    local function note(msg)
        local length, sid, mtype = ttrpc_header(msg, 1)
        if mtype == 1 then
            local m = ttrpc_method(msg:sub(TTRPC_HEADER + 1, TTRPC_HEADER + length))
            if m then s.ttrpc_requests[sid] = { method = m, frame = number } end
        elseif mtype == 2 and s.ttrpc_requests[sid] then
            rec.ttrpc.matches = rec.ttrpc.matches or {}
            rec.ttrpc.matches[sid] = s.ttrpc_requests[sid]
        end
    end
    for _, w in ipairs(rec.ttrpc.whole) do note(data:sub(w.off + 1, w.off + w.len)) end
    for _, m in ipairs(rec.ttrpc.rebuilt) do note(m.bytes) end
end

local function heuristic(data)
    for _, h in ipairs(HEURISTICS) do
        if h.detect(data) then return h.name end
    end
    return nil
end

-- How one direction's payloads are read, decided at its first payload: ttrpc with
-- reassembly when the port table names ttrpc (and the payload starts with a ttrpc header)
-- or when the payload is strictly ttrpc; another port-table dissector; else heuristics,
-- packet by packet.
local function choose(s, data)
    for _, port in ipairs({ s.sport, s.cport }) do
        local d = port_table:get_dissector(port)
        if d ~= nil then
            local name = tostring(d):lower()
            if name ~= "ttrpc" then return { name = name, dissector = d } end
            return { ttrpc = ttrpc_header(data, 1) ~= nil }
        end
    end
    return { ttrpc = ttrpc_detect(data) }
end

local function read_payload(s, rec, data, cut, number)
    local mode = s.mode[rec.dir]
    if mode == nil then
        if data == nil then return end
        mode = choose(s, data)
        s.mode[rec.dir] = mode
    end
    if mode.ttrpc then
        ttrpc_feed(s, rec, rec.dir, cut and "" or data, cut, number)
        if rec.ttrpc ~= nil then
            rec.proto = "ttrpc"
            return
        end
    elseif mode.dissector then
        rec.proto, rec.dissector = mode.name, mode.dissector
        return
    end
    if data ~= nil and not cut then rec.proto = heuristic(data) end
end

local function first_pass(h, number, ts, trusted, cut)
    local lo_c, lo_p, hi_c, hi_p = h.src_cid, h.src_port, h.dst_cid, h.dst_port
    if ep_less(hi_c, hi_p, lo_c, lo_p) then lo_c, lo_p, hi_c, hi_p = hi_c, hi_p, lo_c, lo_p end
    local key = string.format("%d|%d:%d|%d:%d", h.type, lo_c, lo_p, hi_c, hi_p)
    local rec = {}
    local s = current[key]
    if h.op == OP.REQUEST or s == nil then
        if h.op == OP.REQUEST and s ~= nil and (s.state == "ESTABLISHED" or s.state == "CLOSING") then
            expert_add(rec, E.dup_request, string.format(
                "REQUEST while stream %d on this address pair is still %s", s.index, s.state))
        end
        s = new_stream(h)
        current[key] = s
    end
    rec.stream = s.index
    local from_client = h.src_cid == s.ccid and h.src_port == s.cport
    rec.dir = from_client and "c2s" or "s2c"
    local snd, rcv = s.side[rec.dir], s.side[from_client and "s2c" or "c2s"]
    account(s, rec, h, snd, rcv)
    transition(s, rec, h, from_client, ts, number)
    if h.op == OP.RW and h.len > 0 then read_payload(s, rec, trusted, cut, number) end
    return rec
end

---------------------------------------------------------------------------------------
-- Display
---------------------------------------------------------------------------------------

local function flag_text(h)
    local names = {}
    if h.op == OP.SHUTDOWN then
        if has(h.flags, SHUT.RCV) then table.insert(names, "SHUT_RCV") end
        if has(h.flags, SHUT.SEND) then table.insert(names, "SHUT_SEND") end
    elseif h.op == OP.RW and h.type == TYPE.SEQPACKET then
        if has(h.flags, SEQ.EOM) then table.insert(names, "EOM") end
        if has(h.flags, SEQ.EOR) then table.insert(names, "EOR") end
    end
    return table.concat(names, "|")
end

local function show_payload(rec, ptvb, pinfo, tree, item)
    if rec.proto == nil or ptvb == nil then return nil end
    item:add(F.payload_proto, rec.proto):set_generated()
    if rec.proto == "ttrpc" then
        if rec.ttrpc == nil then return nil end
        local parts = {}
        for _, w in ipairs(rec.ttrpc.whole) do
            table.insert(parts, ttrpc_dissect(ptvb(w.off, w.len):tvb(), pinfo, tree,
                                              rec.ttrpc.matches))
        end
        for _, m in ipairs(rec.ttrpc.rebuilt) do
            item:add(F.segments, m.frames):set_generated()
            local rtvb = ByteArray.new(m.bytes, true):tvb("Reassembled ttrpc")
            table.insert(parts, ttrpc_dissect(rtvb, pinfo, tree, rec.ttrpc.matches))
        end
        local head = rec.ttrpc.head
        if #rec.ttrpc.whole == 0 and #rec.ttrpc.rebuilt == 0 then
            local seg = item:add(F.segment, ptvb())
            if rec.reassembled_in then
                seg:add(F.reassembled_in, rec.reassembled_in):set_generated()
            end
            table.insert(parts, string.format("ttrpc segment, %d bytes", ptvb:len()))
        elseif head ~= nil and rec.reassembled_in then
            item:add(F.reassembled_in, rec.reassembled_in):set_generated()
        end
        if head ~= nil and (#rec.ttrpc.whole > 0 or #rec.ttrpc.rebuilt > 0) then
            parts[#parts + 1] = string.format("+ ttrpc segment %d bytes", ptvb:len() - head)
        end
        pinfo.cols.protocol:set("ttrpc")
        return table.concat(parts, "; ")
    end
    if rec.dissector ~= nil then
        rec.dissector:call(ptvb, pinfo, tree)
        return nil
    end
    if rec.proto == "sd_notify" then
        local summary = sd_notify_dissect(ptvb, pinfo, tree)
        pinfo.cols.protocol:set("sd_notify")
        return summary
    end
    local raw = ptvb:raw()
    Dissector.get(WS_DISSECTOR[rec.proto]):call(ptvb, pinfo, tree)
    if rec.proto == "http" then return nil end -- HTTP writes its own Info text
    local first = raw:match("^%s*([^\r\n]*)"):gsub("%s+", " ")
    if #first > 60 then first = first:sub(1, 59) .. "…" end
    return first
end

-- The virtio header of a vsock frame, and where its payload starts, or nil when the frame
-- carries none (the same rule as vsockmon's decoder: a VIRTIO transport and room for it).
local function read_headers(tvb)
    if tvb:len() < MON_HDR.size + VIRTIO_HDR.size
        or field(tvb, 0, MON_HDR, "transport") ~= TRANSPORT.VIRTIO then
        return nil
    end
    local h = {}
    for name, _ in pairs(VIRTIO_HDR.fields) do h[name] = field(tvb, MON_HDR.size, VIRTIO_HDR, name) end
    return h, MON_HDR.size + field(tvb, 0, MON_HDR, "trans_len")
end

-- `vsockmon export` writes each finding of `vsockmon diagnose` into the packet comment of its
-- evidence frames as "diagnose: SEVERITY rule: message" (parts joined by "; ").
local f_comment = Field.new("frame.comment")
local DIAGNOSE_EXPERT = { ERROR = "diagnose_error", WARNING = "diagnose_warning",
                          INFO = "diagnose_info" }

local function diagnose_experts(t)
    for _, fi in ipairs({ f_comment() }) do
        local text = tostring(fi.value)
        for severity, rule, from in text:gmatch("diagnose: (%u+) ([%w/%-]+): ()") do
            local stop = text:find("; diagnose: ", from, true)
            local message = text:sub(from, stop and stop - 1 or -1)
            local e = E[DIAGNOSE_EXPERT[severity] or "diagnose_info"]
            t:add_proto_expert_info(e, rule .. ": " .. message)
        end
    end
end

local function analyse(tvb, pinfo, tree)
    local h, payload_off = read_headers(tvb)
    if h == nil then return end
    local op = h.op
    local captured = math.max(tvb:len() - payload_off, 0)
    local ptvb = nil
    if captured > 0 and h.len > 0 then
        ptvb = tvb(payload_off, math.min(captured, h.len)):tvb()
    end
    local rec = frames[pinfo.number]
    if rec == nil then
        -- Trust the header's len (the tap-length bug appends later fragments' bytes).
        local trusted = ptvb and ptvb:raw() or nil
        rec = first_pass(h, pinfo.number, pinfo.abs_ts, trusted, captured < h.len)
        frames[pinfo.number] = rec
    end
    local s = streams[rec.stream + 1]

    local t = tree:add(vsm, tvb(), string.format("vsockmon analysis, stream %d", rec.stream))
    t:add(F.stream, rec.stream):set_generated()
    t:add(F.type_name, name_of(TYPE_NAMES, h.type)):set_generated()
    t:add(F.op_name, name_of(OP_NAMES, op)):set_generated()
    local flags_text = flag_text(h)
    local fi = t:add(F.flags, h.flags)
    fi:set_generated()
    if flags_text ~= "" then fi:append_text(" (" .. flags_text .. ")") end
    if op == OP.SHUTDOWN then
        fi:add(F.shut_rcv, h.flags):set_generated()
        fi:add(F.shut_send, h.flags):set_generated()
    elseif op == OP.RW and h.type == TYPE.SEQPACKET then
        fi:add(F.seq_eom, h.flags):set_generated()
        fi:add(F.seq_eor, h.flags):set_generated()
    end
    local client = string.format("%d:%d", s.ccid, s.cport)
    local server = string.format("%d:%d", s.scid, s.sport)
    t:add(F.client, client):set_generated()
    t:add(F.server, server):set_generated()
    t:add(F.client_cid, s.ccid):set_hidden()
    t:add(F.client_port, s.cport):set_hidden()
    t:add(F.server_cid, s.scid):set_hidden()
    t:add(F.server_port, s.sport):set_hidden()
    t:add(F.dir, rec.dir):set_generated()
    t:add(F.state, rec.state):set_generated()
    if rec.request_in then
        t:add(F.request_in, rec.request_in):set_generated()
        t:add(F.handshake, rec.handshake):set_generated()
    end
    if op == OP.RW or captured > 0 then
        t:add(F.len, h.len):set_generated()
        t:add(F.captured, captured):set_generated()
    end
    if rec.seq then
        t:add(F.seq, rec.seq % TWO32):set_generated()
        t:add(F.next_seq, rec.next_seq % TWO32):set_generated()
    end
    if rec.in_flight then
        t:add(F.in_flight, rec.in_flight):set_generated()
        t:add(F.credit, rec.credit):set_generated()
    end
    if tvb:len() == tvb:reported_len() and tvb:len() >= payload_off and captured ~= h.len then
        t:add_proto_expert_info(E.payload_len, string.format(
            "Captured payload %d bytes, header len %d: trust len (kernel tap-length bug)",
            captured, h.len))
    end
    for _, e in ipairs(rec.experts or {}) do t:add_proto_expert_info(e[1], e[2]) end
    diagnose_experts(t)

    local info = nil
    if vsm.prefs.rewrite_info then
        local src = string.format("%d:%d", h.src_cid, h.src_port)
        local dst = string.format("%d:%d", h.dst_cid, h.dst_port)
        info = string.format("[%d] %s → %s %s %s", rec.stream, src, dst,
                             name_of(TYPE_NAMES, h.type), name_of(OP_NAMES, op))
        if flags_text ~= "" then info = info .. " " .. flags_text end
        if op == OP.RW then info = info .. " len=" .. h.len end
        if rec.state == "REFUSED" then info = info .. " (refused)" end
        pinfo.cols.info:set(info)
        if rec.proto == "http" then
            -- HTTP writes its own Info text: keep ours in front of it.
            pinfo.cols.info:append(" | ")
            pinfo.cols.info:fence()
        end
    end
    local summary = show_payload(rec, ptvb, pinfo, tree, t)
    if summary and summary ~= "" then
        t:append_text(", " .. summary)
        -- Set after the sub-dissector ran, so what it appended (JSON does) is replaced.
        if info then pinfo.cols.info:set(info .. " | " .. summary) end
    end
end

-- Take over the vsock link type's entry, calling the built-in dissector first.
local encap_table = DissectorTable.get("wtap_encap")
local builtin_vsock = encap_table:get_dissector(wtap_encaps.VSOCK)

function vsm.dissector(tvb, pinfo, tree)
    -- The built-in dissector throws on a truncated frame (Wireshark has already marked it
    -- "Malformed Packet" by then): carry on with the analysis.
    pcall(builtin_vsock.call, builtin_vsock, tvb, pinfo, tree)
    analyse(tvb, pinfo, tree)
    return tvb:len()
end

encap_table:add(wtap_encaps.VSOCK, vsm)
