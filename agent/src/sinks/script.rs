//! Lua scripts (`-S`), with the C tool's contract: the global `process(packet)` is called for
//! every packet, with a table holding `tv_sec, tv_usec, sip, sport, dip, dport, seq, ack,
//! flags, request, payload, size` (`seq`, `ack`, `flags` for TCP only). Optional `init()` and
//! `finish()` run before the first packet and at exit.
//!
//! In a protocol mode, `on_exchange(e)` is called, when defined, for every paired request,
//! with `e.client, e.server, e.proto, e.command, e.summary, e.latency_us, e.own_us, e.depth,
//! e.ts_us, e.req_bytes, e.rsp_bytes, e.status`. The `tcpkit` library lets a script be a protocol
//! parser of its own: `tcpkit.record{port=…, latency_us=…, command=…, summary=…, client=…,
//! server=…, status=…}` adds an exchange to the port's stats (and the slow log), and
//! `tcpkit.log(…)` writes a line to the log.
//!
//! Lua 5.4 (vendored) has no `bit32`; scripts written for the C tool use it, so a `bit32` with
//! Lua 5.2's results is installed when the Lua has none. A callback that errors is reported
//! (at most once a second, with the script's file and line) and counted; capture goes on. A
//! callback that runs past its instruction budget is stopped the same way; the budget applies
//! to loading the script too.
//!
//! The sandbox: scripts get the standard library without process control and file-system
//! changes ([`SANDBOX`]: no `os.execute`, `os.exit`, `os.remove`, `os.rename`, `os.tmpname`,
//! `os.setlocale`, `io.popen`, `io.tmpfile`, no `io.open` or `io.output` for writing, no C
//! modules), and only text chunks load (a corrupted binary chunk crashes Lua). With
//! [`ScriptLimits::unsafe_library`] (`--script-unsafe`) the full library stays. The Lua state
//! may hold at most [`ScriptLimits::memory_bytes`]; past that the script is stopped for good
//! (reported with its file and the line it last ran, counted) and capture goes on.

use std::cell::Cell;
use std::net::IpAddr;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{ChunkMode, Function, HookTriggers, Lua, Table, VmState};

use crate::steps::decode::{Packet, Transport};
use crate::steps::flow::Direction;

/// Instructions a callback may run, in units of [`HOOK_EVERY`].
const BUDGET_TICKS: u32 = 10_000;
/// The budget hook runs every this many instructions (so the budget is 100M instructions).
const HOOK_EVERY: u32 = 10_000;
/// Errors are reported at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The start of the budget error's message.
const OVER_BUDGET: &str = "instruction budget exceeded";

/// How a script may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptLimits {
    /// Bytes its Lua state may hold (`--script-memory`).
    pub memory_bytes: usize,
    /// The full standard library, binary chunks included (`--script-unsafe`).
    pub unsafe_library: bool,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            unsafe_library: false,
        }
    }
}

/// What scripts get by default: the standard library without process control and file-system
/// changes, and text chunks only (`load`, `loadfile`, `dofile`, `require`). `os.date`,
/// `os.time`, `os.clock`, `os.getenv`, `io.read`, `io.write`, `io.lines` and `io.open` for
/// reading stay.
const SANDBOX: &str = r##"
local unsafe = function(name)
  return function() error(name .. " is not available to scripts (see --script-unsafe)", 2) end
end
for _, name in ipairs({"execute", "exit", "remove", "rename", "tmpname", "setlocale"}) do
  os[name] = unsafe("os." .. name)
end
io.popen = unsafe("io.popen")
io.tmpfile = unsafe("io.tmpfile")
local open, output = io.open, io.output
function io.open(name, mode)
  if mode ~= nil and mode ~= "r" and mode ~= "rb" then
    error("io.open for writing is not available to scripts (see --script-unsafe)", 2)
  end
  return open(name, mode)
end
function io.output(file)
  if file ~= nil then
    error("io.output to a file is not available to scripts (see --script-unsafe)", 2)
  end
  return output()
end
local load_any, loadfile_any = load, loadfile
function load(chunk, name, mode, ...)
  if select("#", ...) > 0 then return load_any(chunk, name, "t", ...) end
  return load_any(chunk, name, "t")
end
function loadfile(name, mode, ...)
  if select("#", ...) > 0 then return loadfile_any(name, "t", ...) end
  return loadfile_any(name, "t")
end
function dofile(name)
  local chunk = assert(loadfile(name))
  return chunk()
end
package.loadlib = unsafe("package.loadlib")
package.cpath = ""
local searchpath = package.searchpath
package.searchers = {
  package.searchers[1],
  function(module)
    local path, err = searchpath(module, package.path)
    if not path then return err end
    local chunk, why = loadfile(path)
    if not chunk then error(why, 2) end
    return chunk, path
  end,
}
"##;

/// Lua 5.2's `bit32`, for Lua 5.4: arguments are taken modulo 2^32, results are in
/// [0, 2^32 - 1].
const BIT32: &str = r#"
local M = {}
local MASK = 0xffffffff
local function u(x) return math.tointeger(math.floor(x) % 4294967296) end
function M.band(...) local r = MASK for _, v in ipairs({...}) do r = r & u(v) end return r end
function M.bor(...) local r = 0 for _, v in ipairs({...}) do r = r | u(v) end return r end
function M.bxor(...) local r = 0 for _, v in ipairs({...}) do r = r ~ u(v) end return r end
function M.bnot(x) return (~u(x)) & MASK end
function M.btest(...) return M.band(...) ~= 0 end
function M.lshift(x, n)
  if n < 0 then return M.rshift(x, -n) end
  if n >= 32 then return 0 end
  return (u(x) << n) & MASK
end
function M.rshift(x, n)
  if n < 0 then return M.lshift(x, -n) end
  if n >= 32 then return 0 end
  return u(x) >> n
end
function M.arshift(x, n)
  x = u(x)
  if n <= 0 then return M.lshift(x, -n) end
  if x & 0x80000000 == 0 then return M.rshift(x, n) end
  if n >= 32 then return MASK end
  return ((x >> n) | ~(MASK >> n)) & MASK
end
function M.lrotate(x, n) n = n % 32 x = u(x) return ((x << n) | (x >> (32 - n))) & MASK end
function M.rrotate(x, n) return M.lrotate(x, -n) end
function M.extract(x, f, w) w = w or 1 return (u(x) >> f) & ((1 << w) - 1) end
function M.replace(x, v, f, w)
  w = w or 1
  local m = ((1 << w) - 1) << f
  return ((u(x) & ~m) | ((u(v) << f) & m)) & MASK
end
return M
"#;

/// Why a script cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The file cannot be read.
    #[error("cannot read script {path}: {detail}")]
    Read {
        /// The script.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Syntax or load-time error.
    #[error("script {path}: {detail}")]
    Load {
        /// The script.
        path: String,
        /// Lua's message.
        detail: String,
    },
    /// No global `process` function (nor `on_exchange`, in a protocol mode).
    #[error("script {0} defines no process(packet) function")]
    NoProcess(String),
}

/// An exchange a script recorded with `tcpkit.record`.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The server port it counts for.
    pub port: u16,
    /// Its latency.
    pub latency_us: u64,
    /// Command name (per-command stats).
    pub command: String,
    /// The slow-log summary.
    pub summary: String,
    /// The client, when given as "ip:port".
    pub client: Option<std::net::SocketAddr>,
    /// The server, when given as "ip:port".
    pub server: Option<std::net::SocketAddr>,
    /// A status other than "ok" or "NOERROR".
    pub error: bool,
    /// Capture time of the request, µs (0 when not given).
    pub ts_us: u64,
}

/// What a script asked for through the `tcpkit` library.
#[derive(Debug, Clone, PartialEq)]
pub enum ScriptOutput {
    /// `tcpkit.record{…}`.
    Record(Recorded),
    /// `tcpkit.log(…)`: one line.
    Log(String),
}

/// Callbacks that failed, by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScriptErrors {
    /// All failed callbacks, those below included.
    pub failed: u64,
    /// Stopped by the instruction budget.
    pub over_budget: u64,
    /// Stopped by the memory limit (the script stops then: 0 or 1).
    pub over_memory: u64,
}

/// A loaded script.
pub struct Script {
    lua: Lua,
    process: Option<Function>,
    on_exchange: Option<Function>,
    finish: Option<Function>,
    outputs: Rc<std::cell::RefCell<Vec<ScriptOutput>>>,
    ticks: Rc<Cell<u32>>,
    /// The line the budget hook last saw running, to say where memory ran out.
    line: Rc<Cell<usize>>,
    name: String,
    memory_bytes: usize,
    errors: ScriptErrors,
    last_report: Option<Instant>,
    unreported: u64,
    /// Lua strings of recent addresses: formatting an address is the costly part of a table.
    addresses: Vec<Option<(IpAddr, mlua::String)>>,
}

/// Slots of the address cache.
const ADDRESS_SLOTS: usize = 64;

impl Script {
    /// Loads the script with the sandbox (unless `limits` say otherwise), `bit32` when
    /// missing, the `tcpkit` library, the instruction budget and the memory limit, and runs
    /// its `init()` when it has one. In raw mode (`raw`) the script must define `process`;
    /// otherwise `process` or `on_exchange`.
    pub fn load(path: &Path, raw: bool, limits: ScriptLimits) -> Result<Self, ScriptError> {
        let name = path.display().to_string();
        let source = std::fs::read(path).map_err(|e| ScriptError::Read {
            path: name.clone(),
            detail: e.to_string(),
        })?;
        let lua = Lua::new();
        let load_err = |e: mlua::Error| ScriptError::Load {
            path: name.clone(),
            detail: describe(&e, limits.memory_bytes),
        };
        if !limits.unsafe_library {
            lua.load(SANDBOX)
                .set_name("=sandbox")
                .exec()
                .map_err(load_err)?;
        }
        if lua
            .globals()
            .get::<Option<Table>>("bit32")
            .map_err(load_err)?
            .is_none()
        {
            let bit32: Table = lua
                .load(BIT32)
                .set_name("=bit32")
                .eval()
                .map_err(load_err)?;
            lua.globals().set("bit32", bit32).map_err(load_err)?;
        }
        let outputs = Rc::new(std::cell::RefCell::new(Vec::new()));
        install_library(&lua, &outputs).map_err(load_err)?;
        let ticks = Rc::new(Cell::new(0u32));
        let line = Rc::new(Cell::new(0usize));
        let (counter, last_line) = (Rc::clone(&ticks), Rc::clone(&line));
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, debug| {
                counter.set(counter.get() + 1);
                last_line.set(debug.current_line().unwrap_or(0));
                if counter.get() > BUDGET_TICKS {
                    let source = debug.source();
                    let file = source.short_src.as_deref().unwrap_or("?");
                    return Err(mlua::Error::runtime(format!(
                        "{file}:{}: {OVER_BUDGET} ({}M instructions)",
                        debug.current_line().unwrap_or(0),
                        u64::from(BUDGET_TICKS) * u64::from(HOOK_EVERY) / 1_000_000
                    )));
                }
                Ok(VmState::Continue)
            },
        )
        .map_err(load_err)?;
        lua.set_memory_limit(limits.memory_bytes)
            .map_err(load_err)?;
        let mut chunk = lua.load(&source).set_name(format!("@{name}"));
        if !limits.unsafe_library {
            chunk = chunk.set_mode(ChunkMode::Text);
        }
        chunk.exec().map_err(load_err)?;
        let globals = lua.globals();
        let process = globals
            .get::<Option<Function>>("process")
            .map_err(load_err)?;
        let on_exchange = globals
            .get::<Option<Function>>("on_exchange")
            .map_err(load_err)?;
        if process.is_none() && (raw || on_exchange.is_none()) {
            return Err(ScriptError::NoProcess(name));
        }
        let init = globals.get::<Option<Function>>("init").map_err(load_err)?;
        let finish = globals
            .get::<Option<Function>>("finish")
            .map_err(load_err)?;
        let mut script = Self {
            lua,
            process,
            on_exchange,
            finish,
            outputs,
            ticks,
            line,
            name,
            memory_bytes: limits.memory_bytes,
            errors: ScriptErrors::default(),
            last_report: None,
            unreported: 0,
            addresses: vec![None; ADDRESS_SLOTS],
        };
        if let Some(init) = init {
            script.call(&init, ());
        }
        Ok(script)
    }

    /// Calls `process(packet)` for one packet.
    pub fn packet(&mut self, ts_sec: i64, ts_usec: u32, p: &Packet<'_>, dir: Direction) {
        let Some(process) = self.process.clone() else {
            return;
        };
        let table = match self.packet_table(ts_sec, ts_usec, p, dir) {
            Ok(t) => t,
            Err(e) => return self.failed(&e),
        };
        self.call(&process, table);
    }

    /// Calls `on_exchange(e)` for one paired request, when the script defines it.
    pub fn exchange(&mut self, e: &crate::matcher::Exchange<'_>, proto: &str) {
        let Some(on_exchange) = self.on_exchange.clone() else {
            return;
        };
        let table = (|| -> mlua::Result<Table> {
            let t = self.lua.create_table_with_capacity(0, 12)?;
            t.raw_set("client", e.client().to_string())?;
            t.raw_set("server", e.server().to_string())?;
            t.raw_set("proto", proto)?;
            t.raw_set("command", self.lua.create_string(e.command)?)?;
            t.raw_set("summary", self.lua.create_string(e.summary)?)?;
            t.raw_set("latency_us", e.latency_us)?;
            t.raw_set("own_us", e.own_us)?;
            t.raw_set("depth", e.depth)?;
            t.raw_set("ts_us", e.req_start_us)?;
            t.raw_set("req_bytes", e.req_bytes)?;
            t.raw_set("rsp_bytes", e.rsp_bytes)?;
            t.raw_set("status", if e.error { "error" } else { "ok" })?;
            Ok(t)
        })();
        match table {
            Ok(t) => self.call(&on_exchange, t),
            Err(e) => self.failed(&e),
        }
    }

    /// What the script asked for with `tcpkit.record` and `tcpkit.log` since the last call.
    pub fn take_outputs(&mut self) -> Vec<ScriptOutput> {
        std::mem::take(&mut *self.outputs.borrow_mut())
    }

    /// Runs `finish()` when the script has one.
    pub fn finish(&mut self) {
        if let Some(finish) = self.finish.take() {
            self.call(&finish, ());
        }
        if self.unreported > 0 {
            eprintln!("tcpkit: script: {} more errors not shown", self.unreported);
        }
    }

    /// Callbacks that failed, by why.
    pub fn errors(&self) -> ScriptErrors {
        self.errors
    }

    /// The Lua string of an address, from the cache when it was seen lately.
    fn address(&mut self, ip: IpAddr) -> mlua::Result<mlua::String> {
        let slot = match ip {
            IpAddr::V4(v4) => usize::from(v4.octets()[3]),
            IpAddr::V6(v6) => usize::from(v6.octets()[15]),
        } % ADDRESS_SLOTS;
        if let Some((cached, s)) = &self.addresses[slot] {
            if *cached == ip {
                return Ok(s.clone());
            }
        }
        let s = self.lua.create_string(ip.to_string())?;
        self.addresses[slot] = Some((ip, s.clone()));
        Ok(s)
    }

    fn packet_table(
        &mut self,
        ts_sec: i64,
        ts_usec: u32,
        p: &Packet<'_>,
        dir: Direction,
    ) -> mlua::Result<Table> {
        let t = self.lua.create_table_with_capacity(0, 12)?;
        t.raw_set("tv_sec", ts_sec)?;
        t.raw_set("tv_usec", ts_usec)?;
        t.raw_set("sip", self.address(p.src)?)?;
        t.raw_set("sport", p.sport)?;
        t.raw_set("dip", self.address(p.dst)?)?;
        t.raw_set("dport", p.dport)?;
        if let Transport::Tcp { seq, ack, flags } = p.transport {
            t.raw_set("seq", seq)?;
            t.raw_set("ack", ack)?;
            t.raw_set("flags", flags)?;
        }
        t.raw_set("request", dir == Direction::Request)?;
        t.raw_set("payload", self.lua.create_string(p.payload)?)?;
        t.raw_set("size", p.payload.len())?;
        Ok(t)
    }

    fn call(&mut self, f: &Function, args: impl mlua::IntoLuaMulti) {
        self.ticks.set(0);
        if let Err(e) = f.call::<()>(args) {
            self.failed(&e);
        }
    }

    fn failed(&mut self, e: &mlua::Error) {
        self.errors.failed += 1;
        if is_out_of_memory(e) {
            // What the script holds stays held: it is stopped for good, and said so always.
            self.errors.over_memory += 1;
            self.process = None;
            self.on_exchange = None;
            self.finish = None;
            eprintln!(
                "tcpkit: script {} stopped: {} (last seen running line {}); capture goes on",
                self.name,
                describe(e, self.memory_bytes),
                self.line.get()
            );
            return;
        }
        let message = e.to_string();
        if message.contains(OVER_BUDGET) {
            self.errors.over_budget += 1;
        }
        let now = Instant::now();
        if self
            .last_report
            .is_some_and(|t| now.duration_since(t) < REPORT_EVERY)
        {
            self.unreported += 1;
            return;
        }
        self.last_report = Some(now);
        let first_line = message.lines().next().unwrap_or_default();
        eprintln!(
            "tcpkit: script error ({} so far): {first_line}",
            self.errors.failed
        );
    }
}

/// True when the error is, or was caused by, the memory limit.
fn is_out_of_memory(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_out_of_memory(cause),
        mlua::Error::WithContext { cause, .. } => is_out_of_memory(cause),
        _ => false,
    }
}

/// Lua's message, in words for the memory limit.
fn describe(e: &mlua::Error, memory_bytes: usize) -> String {
    if is_out_of_memory(e) {
        format!(
            "memory limit of {} MiB reached (--script-memory)",
            memory_bytes >> 20
        )
    } else {
        e.to_string()
    }
}

/// Installs the `tcpkit` table: `record{…}` and `log(…)` push to `outputs`.
fn install_library(
    lua: &Lua,
    outputs: &Rc<std::cell::RefCell<Vec<ScriptOutput>>>,
) -> mlua::Result<()> {
    let library = lua.create_table()?;
    let out = Rc::clone(outputs);
    let record = lua.create_function(move |_, t: Table| {
        let address = |key: &str| -> mlua::Result<Option<std::net::SocketAddr>> {
            Ok(t.get::<Option<String>>(key)?.and_then(|s| s.parse().ok()))
        };
        let status: Option<String> = t.get("status")?;
        let command: Option<String> = t.get("command")?;
        let summary: Option<String> = t.get("summary")?;
        let recorded = Recorded {
            port: t.get("port")?,
            latency_us: t.get("latency_us")?,
            summary: summary.or_else(|| command.clone()).unwrap_or_default(),
            command: command.unwrap_or_else(|| "OTHER".into()),
            client: address("client")?,
            server: address("server")?,
            error: status.is_some_and(|s| s != "ok" && s != "NOERROR"),
            ts_us: t.get::<Option<u64>>("ts_us")?.unwrap_or(0),
        };
        out.borrow_mut().push(ScriptOutput::Record(recorded));
        Ok(())
    })?;
    library.set("record", record)?;
    let out = Rc::clone(outputs);
    let log = lua.create_function(move |_, args: mlua::Variadic<mlua::Value>| {
        let words: Vec<String> = args
            .iter()
            .map(|v| v.to_string().unwrap_or_default())
            .collect();
        out.borrow_mut().push(ScriptOutput::Log(words.join(" ")));
        Ok(())
    })?;
    library.set("log", log)?;
    lua.globals().set("tcpkit", library)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(source: &str) -> Result<Script, ScriptError> {
        script_with(source, ScriptLimits::default())
    }

    /// A fresh file in a directory of this test process.
    fn temp_path(suffix: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tcpkit-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        dir.join(format!("script-{n}{suffix}"))
    }

    fn script_with(source: &str, limits: ScriptLimits) -> Result<Script, ScriptError> {
        let path = temp_path(".lua");
        std::fs::write(&path, source).unwrap();
        Script::load(&path, true, limits)
    }

    /// Evaluates `expr` in the script's state, as a callback would.
    fn eval(s: &Script, expr: &str) -> mlua::Result<String> {
        s.lua.load(expr).set_mode(ChunkMode::Text).eval()
    }

    const UNSAFE: ScriptLimits = ScriptLimits {
        memory_bytes: 256 << 20,
        unsafe_library: true,
    };

    #[test]
    fn process_control_and_file_changes_are_refused_by_default() {
        let s = script("function process(p) end").unwrap();
        let file = temp_path(".txt");
        std::fs::write(&file, "kept").unwrap();
        let f = file.display();
        for call in [
            "os.execute('true')".to_string(),
            "os.exit(3)".to_string(),
            format!("os.remove('{f}')"),
            format!("os.rename('{f}', '{f}.moved')"),
            "os.tmpname()".to_string(),
            "io.popen('id')".to_string(),
            "io.tmpfile()".to_string(),
            format!("io.open('{f}', 'w')"),
            format!("io.open('{f}', 'a+')"),
            format!("io.output('{f}')"),
            "package.loadlib('libc.so.6', 'puts')".to_string(),
        ] {
            let e = eval(&s, &format!("return tostring({call})")).unwrap_err();
            assert!(e.to_string().contains("not available"), "{call}: {e}");
        }
        // No C modules through require.
        assert_eq!(
            eval(&s, "return package.cpath .. #package.searchers").unwrap(),
            "2"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept");
        // What the C-era scripts use stays.
        let kept = format!(
            "return table.concat({{os.date('%Y', 0), tostring(os.time() > 0),              tostring(os.clock() >= 0), io.open('{f}', 'r'):read('a'),              string.format('%d', math.max(1, 2)), bit32.band(3, 1)}}, ' ')"
        );
        assert_eq!(eval(&s, &kept).unwrap(), "1970 true true kept 2 1");
    }

    #[test]
    fn the_full_library_with_script_unsafe() {
        let s = script_with("function process(p) end", UNSAFE).unwrap();
        let file = temp_path(".txt");
        let f = file.display();
        eval(
            &s,
            &format!("local h = io.open('{f}', 'w') h:write('written') h:close() return ''"),
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "written");
        assert_eq!(
            eval(&s, "return tostring(os.execute('true'))").unwrap(),
            "true"
        );
    }

    #[test]
    fn only_text_chunks_load() {
        let s = script("function process(p) end").unwrap();
        // A binary chunk, cut and corrupted: Lua would crash on it.
        let got = eval(
            &s,
            "local b = string.dump(function(x) return x + 1 end)              local f, why = load(b:sub(1, 30) .. string.rep('\\255', 40))              return tostring(f) .. ' ' .. why",
        )
        .unwrap();
        assert!(got.starts_with("nil ") && got.contains("binary"), "{got}");
        let dumped = temp_path(".luac");
        let write = format!(
            "local h = assert(io.open('{}', 'wb')) h:write(string.dump(function() end)) h:close()",
            dumped.display()
        );
        let u = script_with("function process(p) end", UNSAFE).unwrap();
        u.lua.load(write).exec().unwrap();
        let got = eval(
            &s,
            &format!(
                "local f, why = loadfile('{}') return tostring(f) .. ' ' .. why",
                dumped.display()
            ),
        )
        .unwrap();
        assert!(got.starts_with("nil ") && got.contains("binary"), "{got}");
        let e = eval(&s, &format!("dofile('{}') return ''", dumped.display())).unwrap_err();
        assert!(e.to_string().contains("binary"), "{e}");
        // The script itself: a binary file is refused with the sandbox.
        match Script::load(&dumped, true, ScriptLimits::default()) {
            Err(ScriptError::Load { detail, .. }) => assert!(detail.contains("binary"), "{detail}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a binary chunk loaded"),
        }
        // With the environment argument, load still works on text.
        assert_eq!(
            eval(&s, "return load('return x', 'c', 't', {x = 'env'})()").unwrap(),
            "env"
        );
        assert_eq!(
            eval(&s, "y = 'global' return load('return y')()").unwrap(),
            "global"
        );
    }

    #[test]
    fn the_budget_applies_to_loading_and_names_the_line() {
        match script("x = 0\nwhile true do\n  x = x + 1\nend\nfunction process(p) end") {
            Err(ScriptError::Load { detail, .. }) => {
                assert!(detail.contains(OVER_BUDGET), "{detail}");
                assert!(
                    detail.contains(".lua:2:") || detail.contains(".lua:3:"),
                    "{detail}"
                );
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("an endless top level loaded"),
        }
    }

    #[test]
    fn past_its_memory_limit_the_script_stops_and_capture_goes_on() {
        let limits = ScriptLimits {
            memory_bytes: 16 << 20,
            unsafe_library: false,
        };
        let mut s = script_with(
            "calls = 0\nkept = {}\nfunction process(p)\n calls = calls + 1\n              for i = 1, 1e9 do kept[#kept + 1] = string.rep('x', 64) .. i end\nend",
            limits,
        )
        .unwrap();
        for _ in 0..3 {
            s.packet(0, 0, &packet(), Direction::Request);
        }
        assert_eq!(
            s.errors(),
            ScriptErrors {
                failed: 1,
                over_budget: 0,
                over_memory: 1
            }
        );
        assert!(s.lua.used_memory() <= 16 << 20);
        // At load, the limit is a load error.
        match script_with(
            "t = {} for i = 1, 1e9 do t[i] = i end function process(p) end",
            limits,
        ) {
            Err(ScriptError::Load { detail, .. }) => {
                assert!(detail.contains("memory limit of 16 MiB"), "{detail}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("loaded past the limit"),
        }
    }

    #[test]
    fn bit32_gives_lua_5_2_results() {
        let s = script("function process(p) end").unwrap();
        let check = |expr: &str, want: i64| {
            let got: i64 = s.lua.load(expr).eval().unwrap();
            assert_eq!(got, want, "{expr}");
        };
        check("bit32.band(0xff0f, 0x0ff0)", 0x0f00);
        check("bit32.bor(1, 2, 4)", 7);
        check("bit32.bxor(5, 3)", 6);
        check("bit32.bnot(0)", 0xffffffff);
        check("bit32.lshift(1, 31)", 0x80000000);
        check("bit32.lshift(1, 32)", 0);
        check("bit32.rshift(0x80000000, 31)", 1);
        check("bit32.rshift(-1, 28)", 15);
        check("bit32.arshift(0x80000000, 4)", 0xf8000000);
        check("bit32.band(-1)", 0xffffffff);
        check("bit32.extract(0xabcd, 4, 8)", 0xbc);
        check("bit32.lrotate(0x80000001, 1)", 3);
    }

    #[test]
    fn load_errors_are_clear() {
        assert!(matches!(
            script("function process(p)"),
            Err(ScriptError::Load { .. })
        ));
        assert!(matches!(script("x = 1"), Err(ScriptError::NoProcess(_))));
        assert!(matches!(
            Script::load(
                Path::new("/nonexistent/x.lua"),
                true,
                ScriptLimits::default()
            ),
            Err(ScriptError::Read { .. })
        ));
    }

    fn packet() -> Packet<'static> {
        Packet {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            sport: 40000,
            dport: 6379,
            transport: Transport::Tcp {
                seq: 1,
                ack: 2,
                flags: 24,
            },
            payload: b"PING\r\n",
        }
    }

    #[test]
    fn the_packet_table_has_the_seed_fields() {
        let mut s = script(
            "seen = nil\nfunction process(p) seen = string.format('%d %d %s:%d %s:%d %d %d %d %s %s %d', \
             p.tv_sec, p.tv_usec, p.sip, p.sport, p.dip, p.dport, p.seq, p.ack, p.flags, \
             tostring(p.request), p.payload, p.size) end",
        )
        .unwrap();
        s.packet(1_700_000_000, 42, &packet(), Direction::Request);
        let seen: String = s.lua.globals().get("seen").unwrap();
        assert_eq!(
            seen,
            "1700000000 42 10.0.0.1:40000 10.0.0.2:6379 1 2 24 true PING\r\n 6"
        );
        assert_eq!(s.errors(), ScriptErrors::default());
    }

    #[test]
    fn errors_and_endless_loops_are_counted_and_capture_goes_on() {
        let mut s = script("n = 0\nfunction process(p) n = n + 1 if n == 2 then while true do end end error('boom') end").unwrap();
        for _ in 0..3 {
            s.packet(0, 0, &packet(), Direction::Request);
        }
        assert_eq!(
            s.errors(),
            ScriptErrors {
                failed: 3,
                over_budget: 1,
                over_memory: 0
            }
        );
    }

    #[test]
    fn init_and_finish_run_once() {
        let mut s = script("calls = ''\nfunction init() calls = calls .. 'i' end\nfunction process(p) calls = calls .. 'p' end\nfunction finish() calls = calls .. 'f' end").unwrap();
        s.packet(0, 0, &packet(), Direction::Response);
        s.finish();
        s.finish();
        let calls: String = s.lua.globals().get("calls").unwrap();
        assert_eq!(calls, "ipf");
    }
}
