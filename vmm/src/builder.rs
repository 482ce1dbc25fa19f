//! Builds a VM from a [`VmConfig`] and runs it: opens every input first (so bad input fails
//! before anything is created), sets up KVM, memory, the kernel and the devices, creates the
//! files and sockets the VM owns, then starts the vCPU threads, the I/O thread and the main
//! loop.

use std::{
    fs::File,
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::{
    epoll::{ControlOperation, Epoll, EpollEvent, EventSet},
    eventfd::{EFD_NONBLOCK, EventFd},
};

use crate::{
    arch::x86_64::{boot, layout, mptable},
    config::{SerialOutput, VmConfig},
    control::{self, Command, ControlEvent, ControlServer},
    devices::{
        bus::Bus,
        legacy::{
            boot_timer::BootTimer,
            i8042::I8042,
            serial::{Ring, SerialDevice, SerialMetrics, SerialOut, SerialSink},
        },
        virtio::{
            VirtioDevice,
            block::{Block, BlockError, metrics::BlockMetrics},
            mmio::{MmioTransport, QUEUE_NOTIFY},
            net::{Net, NetError, metrics::NetMetrics},
            vsock::{Vsock, VsockError, metrics::VsockMetrics},
        },
    },
    exit::{ExitReason, ExitSignal},
    metrics::{metrics, process_start},
    seccomp::{self, ThreadKind},
    vstate::{
        self,
        memory::MemoryError,
        vcpu::{Vcpu, VcpuError},
        vm::{Vm, VmError},
    },
};

/// Why the VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The kernel file could not be opened.
    #[error("Cannot open kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// The initrd could not be opened.
    #[error("Cannot open initrd {0}")]
    OpenInitrd(String, #[source] std::io::Error),
    /// The kernel could not be loaded.
    #[error("Cannot load kernel {0}")]
    Kernel(String, #[source] boot::BootError),
    /// The initrd, command line or boot parameters could not be written.
    #[error("Cannot prepare the boot")]
    Boot(#[source] boot::BootError),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// The network device could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// KVM is unusable.
    #[error(transparent)]
    Kvm(#[from] vstate::kvm::KvmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot read the CPUID KVM supports")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// A device could not be placed.
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::BusError),
    /// The serial output file.
    #[error("Cannot create serial output file {0}")]
    SerialFile(String, #[source] std::io::Error),
    /// The control socket.
    #[error("Cannot open the control socket")]
    Control(#[source] control::ControlError),
    /// A system resource (eventfd, epoll, signalfd, thread).
    #[error("Cannot create {0}")]
    Resource(&'static str, #[source] std::io::Error),
    /// Seccomp.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

/// Files the VMM created: removed on failure, sockets also at exit.
#[derive(Debug, Default)]
pub struct Cleanup {
    sockets: Vec<PathBuf>,
    outputs: Vec<PathBuf>,
}

impl Cleanup {
    /// Removes what must not outlive the process (`success`: keep output files).
    pub fn run(&mut self, success: bool) {
        for p in self.sockets.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        let outputs = std::mem::take(&mut self.outputs);
        if !success {
            for p in outputs {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Records a socket the VMM bound.
    pub fn socket(&mut self, p: PathBuf) {
        self.sockets.push(p);
    }

    /// Records an output file the VMM created.
    pub fn output(&mut self, p: PathBuf) {
        self.outputs.push(p);
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio device to wire: name, device, its queue events, its I/O-thread subscriber.
type VirtioEntry = (
    String,
    Arc<Mutex<dyn VirtioDevice>>,
    Vec<EventFd>,
    Subscriber,
);

/// A built VM, ready to start.
pub struct Vmm {
    p: VmmParts,
    // Kept alive for as long as the guest runs.
    _vm: Vm,
    _mem: GuestMemoryMmap,
    _kvm: kvm_ioctls::Kvm,
}

/// What the VMM's threads use.
struct VmmParts {
    /// SIGTERM, SIGINT and SIGHUP (blocked in every thread).
    sigfd: RawFd,
    /// Queue-notify ioeventfds to register once the guest runs: (event, address, queue).
    ioevents: Vec<(EventFd, u64, u32)>,
    config: VmConfig,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_ring: Option<Arc<Mutex<Ring>>>,
    i8042: Arc<Mutex<I8042>>,
    vcpus: Vec<Vcpu>,
    subscribers: Vec<Subscriber>,
    control: Option<ControlServer>,
}

fn evt() -> Result<EventFd, BuildError> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::Resource("an eventfd", e))
}

/// Builds the VM; files it creates are recorded in `cleanup`.
pub fn build(config: VmConfig, cleanup: &mut Cleanup) -> Result<Vmm, BuildError> {
    // Before any thread exists (all inherit the mask) and before any file the agent may see:
    // SIGTERM from then on ends the VM through the main loop.
    let sigfd = signal_fd()?;
    // 1. Open every input: nothing has been created yet if one is missing.
    let kernel_shown = config.kernel.display().to_string();
    let kernel_file =
        File::open(&config.kernel).map_err(|e| BuildError::OpenKernel(kernel_shown.clone(), e))?;
    let initrd_file = match &config.initrd {
        Some(p) => {
            Some(File::open(p).map_err(|e| BuildError::OpenInitrd(p.display().to_string(), e))?)
        }
        None => None,
    };
    let mut virtio: Vec<VirtioEntry> = Vec::new();
    for (i, d) in config.disks.iter().enumerate() {
        let m = Arc::new(BlockMetrics::default());
        let block = Block::new(
            &d.path,
            d.read_only,
            d.id.as_deref(),
            d.io_engine,
            m.clone(),
        )?;
        metrics().register(format!("block{i}"), m);
        let qevt = block
            .queue_evt
            .try_clone()
            .map_err(|e| BuildError::Resource("an eventfd", e))?;
        let dev = Arc::new(Mutex::new(block));
        virtio.push((format!("block{i}"), dev.clone(), vec![qevt], dev));
    }
    if let Some(n) = &config.net {
        let m = Arc::new(NetMetrics::default());
        let net = Net::new(n, m.clone())?;
        metrics().register("net0", m);
        let qevts = net.queue_evts()?;
        let dev = Arc::new(Mutex::new(net));
        virtio.push(("net0".into(), dev.clone(), qevts, dev));
    }
    let mut vsock_dev = None;
    if let Some(v) = &config.vsock {
        let m = Arc::new(VsockMetrics::default());
        let vsock = Vsock::new(v.cid, v.uds_path.clone(), m.clone())?;
        metrics().register("vsock", m);
        let qevts = vsock.queue_evts()?;
        let dev = Arc::new(Mutex::new(vsock));
        vsock_dev = Some(dev.clone());
        virtio.push(("vsock".into(), dev.clone(), qevts, dev));
    }

    phase("inputs opened");
    // 2. KVM, memory, the VM.
    let kvm = vstate::kvm::open()?;
    let mem = vstate::memory::create(config.memory_mib)?;
    phase("KVM opened, memory mapped");
    let vm = Vm::create(&kvm)?;
    phase("VM created");
    // Registering memory and creating the irqchip each wait for a grace period in KVM (several
    // ms on some hosts): overlap them, and the memory slot with everything up to the vCPUs.
    std::thread::scope(|s| {
        let slots = s.spawn(|| vm.register_memory(&mem));
        let built = build_on(
            sigfd,
            config,
            cleanup,
            &kvm,
            &vm,
            &mem,
            kernel_file,
            initrd_file,
            virtio,
            vsock_dev,
        );
        let slots = slots
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        slots?;
        phase("memory slots registered");
        built
    })
    .map(|p| Vmm {
        p,
        _vm: vm,
        _mem: mem,
        _kvm: kvm,
    })
}

/// Everything after the VM exists: irqchip, kernel, devices, vCPUs, files.
#[allow(clippy::too_many_arguments)]
fn build_on(
    sigfd: RawFd,
    config: VmConfig,
    cleanup: &mut Cleanup,
    kvm: &kvm_ioctls::Kvm,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mut kernel_file: File,
    mut initrd_file: Option<File>,
    virtio: Vec<VirtioEntry>,
    vsock_dev: Option<Arc<Mutex<Vsock>>>,
) -> Result<VmmParts, BuildError> {
    vm.setup_irqchip()?;
    phase("irqchip and PIT created");
    let kernel_shown = config.kernel.display().to_string();

    // 3. The kernel, command line, initrd, zero page, MP table.
    let kernel = boot::load_kernel(mem, &mut kernel_file)
        .map_err(|e| BuildError::Kernel(kernel_shown, e))?;
    let mut cmdline = config.cmdline.clone();
    for i in 0..virtio.len() as u32 {
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            layout::virtio_mmio_addr(i),
            layout::virtio_irq(i)
        ));
    }
    let cmdline = cmdline.trim().to_owned();
    boot::write_cmdline(mem, &cmdline).map_err(BuildError::Boot)?;
    let initrd = match initrd_file.as_mut() {
        Some(f) => Some(boot::load_initrd(mem, f, kernel.end).map_err(BuildError::Boot)?),
        None => None,
    };
    boot::write_boot_params(mem, config.memory_mib << 20, &kernel, cmdline.len(), initrd)
        .map_err(BuildError::Boot)?;
    mptable::write(mem, config.vcpus)?;

    phase("kernel loaded, boot structures written");
    // 4. Devices.
    let exit = Arc::new(ExitSignal::new().map_err(|e| BuildError::Resource("an eventfd", e))?);
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let serial_metrics = Arc::new(SerialMetrics::default());
    metrics().register("serial", serial_metrics.clone());
    let mut serial_ring = None;
    let sink = match &config.serial {
        SerialOutput::Stdout => SerialSink::Stdout,
        SerialOutput::None => SerialSink::Null,
        SerialOutput::Ring => {
            let ring = Arc::new(Mutex::new(Ring::new(config.serial_ring_bytes)));
            serial_ring = Some(ring.clone());
            SerialSink::Ring(ring)
        }
        // Created in step 6, with the other files.
        SerialOutput::File(_) => SerialSink::Null,
    };
    let serial_irq = evt()?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        SerialOut::new(sink, serial_metrics.clone()),
    )));
    pio.insert(
        u64::from(layout::SERIAL_PORT_BASE),
        u64::from(layout::SERIAL_PORT_LEN),
        serial.clone(),
    )?;
    let kbd_irq = evt()?;
    vm.register_irqfd(&kbd_irq, layout::I8042_KBD_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), kbd_irq)));
    pio.insert(
        u64::from(layout::I8042_DATA_PORT),
        u64::from(layout::I8042_COMMAND_PORT - layout::I8042_DATA_PORT + 1),
        i8042.clone(),
    )?;
    mmio.insert(
        layout::BOOT_TIMER_ADDR,
        layout::BOOT_TIMER_SIZE,
        Arc::new(Mutex::new(BootTimer)),
    )?;

    let mut subscribers: Vec<Subscriber> = Vec::new();
    let mut ioevents = Vec::new();
    for (i, (_name, dev, queue_evts, sub)) in virtio.into_iter().enumerate() {
        let addr = layout::virtio_mmio_addr(i as u32);
        let irq = evt()?;
        vm.register_irqfd(&irq, layout::virtio_irq(i as u32))?;
        // Each ioeventfd costs KVM a grace period (milliseconds on some hosts): they are
        // registered once the guest runs (see `Vmm::run`); until then the transport forwards
        // queue notifications itself.
        let mut fallback = Vec::with_capacity(queue_evts.len());
        for (q, qevt) in queue_evts.into_iter().enumerate() {
            fallback.push(
                qevt.try_clone()
                    .map_err(|e| BuildError::Resource("an eventfd", e))?,
            );
            ioevents.push((qevt, addr + QUEUE_NOTIFY, q as u32));
        }
        let transport = MmioTransport::new(dev, mem.clone(), Arc::new(irq), fallback);
        mmio.insert(
            addr,
            layout::VIRTIO_MMIO_SIZE,
            Arc::new(Mutex::new(transport)),
        )?;
        subscribers.push(sub);
    }

    phase("devices created");
    // 5. vCPUs.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::Cpuid)?;
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for i in 0..config.vcpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(i))
            .map_err(|e| VcpuError::Create(i, e))?;
        let vcpu = Vcpu::new(fd, i, pio.clone(), mmio.clone(), exit.clone());
        vcpu.configure(&supported, config.vcpus, kernel.entry, mem)?;
        vcpus.push(vcpu);
    }

    phase("vCPUs configured");
    // 6. Files and sockets the VM owns, last, each recorded for cleanup.
    if let SerialOutput::File(path) = &config.serial {
        let file = File::create(path)
            .map_err(|e| BuildError::SerialFile(path.display().to_string(), e))?;
        cleanup.output(path.clone());
        serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_sink(SerialSink::File(file));
    }
    if let (Some(dev), Some(v)) = (&vsock_dev, &config.vsock) {
        let listener = control::bind_unix(&v.uds_path).map_err(VsockError::Listen)?;
        cleanup.socket(v.uds_path.clone());
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_listener(listener);
    }
    let control = match &config.control_socket {
        Some(path) => {
            let listener = control::bind_unix(path).map_err(BuildError::Control)?;
            cleanup.socket(path.clone());
            Some(ControlServer::new(listener, path.clone()))
        }
        None => None,
    };

    phase("files and sockets created");
    Ok(VmmParts {
        sigfd,
        ioevents,
        config,
        exit,
        serial,
        serial_ring,
        i8042,
        vcpus,
        subscribers,
        control,
    })
}

/// Blocks SIGTERM, SIGINT and SIGHUP (inherited by every thread) and returns a signalfd for
/// them.
fn signal_fd() -> Result<RawFd, BuildError> {
    // SAFETY: sigset operations on a zeroed set we own; pthread_sigmask and signalfd only read
    // it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(BuildError::Resource(
                "a signal mask",
                std::io::Error::last_os_error(),
            ));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(BuildError::Resource(
                "a signalfd",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(fd)
    }
}

fn io_thread(subscribers: Vec<Subscriber>, seccomp_on: bool, exit: Arc<ExitSignal>) {
    let mut manager = match EventManager::<Subscriber>::new() {
        Ok(m) => m,
        Err(e) => {
            exit.signal(ExitReason::VmmError(format!(
                "cannot create the I/O event loop: {e:?}"
            )));
            return;
        }
    };
    for s in subscribers {
        manager.add_subscriber(s);
    }
    if seccomp_on && let Err(e) = seccomp::install(ThreadKind::Io) {
        exit.signal(ExitReason::VmmError(format!("{e:#}")));
        return;
    }
    loop {
        if let Err(e) = manager.run() {
            exit.signal(ExitReason::VmmError(format!(
                "I/O event loop failed: {e:?}"
            )));
            return;
        }
    }
}

/// Logs the time since process start at a build step (debug level: `--log-level debug`).
fn phase(what: &str) {
    tracing::debug!("{what} at {} us", process_start().elapsed().as_micros());
}

const TOKEN_EXIT: u64 = u64::MAX;
const TOKEN_SIGNAL: u64 = u64::MAX - 1;

impl Vmm {
    /// Starts the guest and serves the control socket until the VM ends; returns why it ended.
    /// The caller exits the process (which stops the vCPU and I/O threads).
    pub fn run(mut self) -> Result<ExitReason, BuildError> {
        let sigfd = self.p.sigfd;
        let seccomp_on = self.p.config.seccomp;
        if seccomp_on {
            seccomp::install_sigsys_handler()
                .map_err(|e| BuildError::Resource("a SIGSYS handler", e))?;
        }
        for vcpu in self.p.vcpus.drain(..) {
            let exit = self.p.exit.clone();
            let name = format!("vcpu{}", vcpu.index());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    if seccomp_on && let Err(e) = seccomp::install(ThreadKind::Vcpu) {
                        exit.signal(ExitReason::VmmError(format!("{e:#}")));
                        return;
                    }
                    vcpu.run()
                })
                .map_err(|e| BuildError::Resource("a vCPU thread", e))?;
        }
        if !self.p.subscribers.is_empty() {
            let subs = std::mem::take(&mut self.p.subscribers);
            let exit = self.p.exit.clone();
            std::thread::Builder::new()
                .name("io".into())
                .spawn(move || io_thread(subs, seccomp_on, exit))
                .map_err(|e| BuildError::Resource("the I/O thread", e))?;
        }

        phase("threads started");
        for (evt, addr, queue) in std::mem::take(&mut self.p.ioevents) {
            self._vm.register_mmio_ioevent(&evt, addr, Some(queue))?;
        }
        phase("ioeventfds registered");
        let epoll = Epoll::new().map_err(|e| BuildError::Resource("an epoll", e))?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.p.exit.event().as_raw_fd(), TOKEN_EXIT)
            .map_err(|e| BuildError::Resource("an epoll", e))?;
        add(sigfd, TOKEN_SIGNAL).map_err(|e| BuildError::Resource("an epoll", e))?;
        if let Some(c) = &self.p.control {
            add(c.listener_fd(), c.listener_fd() as u64)
                .map_err(|e| BuildError::Resource("an epoll", e))?;
        }
        if seccomp_on {
            seccomp::install(ThreadKind::Vmm)?;
        }

        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Ok(ExitReason::VmmError(format!("epoll failed: {e}"))),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {}
                    TOKEN_SIGNAL => {
                        let mut info = [0u8; 128];
                        // SAFETY: reads one signalfd_siginfo into a buffer of its size.
                        unsafe { libc::read(sigfd, info.as_mut_ptr().cast(), info.len()) };
                        self.p.exit.signal(ExitReason::Killed);
                    }
                    fd => self.control_ready(fd as RawFd, &epoll),
                }
            }
            if let Some(reason) = self.p.exit.reason() {
                self.p
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .flush();
                return Ok(reason.clone());
            }
        }
    }

    fn control_ready(&mut self, fd: RawFd, epoll: &Epoll) {
        let Some(control) = self.p.control.as_mut() else {
            return;
        };
        if !control.owns(fd) {
            return;
        }
        for event in control.ready(fd) {
            match event {
                ControlEvent::Accepted(c) => {
                    let _ = epoll.ctl(
                        ControlOperation::Add,
                        c,
                        EpollEvent::new(EventSet::IN, c as u64),
                    );
                }
                ControlEvent::Closed(c) => {
                    let _ = epoll.ctl(ControlOperation::Delete, c, EpollEvent::default());
                }
                ControlEvent::Request(c, req) => {
                    let answer = match req {
                        Err(e) => serde_json::json!({"ok": false, "error": e}),
                        Ok(cmd) => self.answer(&cmd),
                    };
                    if let Some(control) = self.p.control.as_mut() {
                        control.reply(c, &answer);
                    }
                }
            }
            if self.p.control.is_none() {
                return;
            }
        }
    }

    fn answer(&self, cmd: &Command) -> serde_json::Value {
        use serde_json::json;
        match cmd {
            Command::Status => json!({
                "ok": true,
                "state": "running",
                "pid": std::process::id(),
                "uptime_ms": process_start().elapsed().as_millis() as u64,
                "boot_time_us": metrics().boot_time_us.load(std::sync::atomic::Ordering::Relaxed),
                "vcpus": self.p.config.vcpus,
                "memory_mib": self.p.config.memory_mib,
            }),
            Command::Metrics => json!({"ok": true, "metrics": metrics().to_json()}),
            Command::Serial => match &self.p.serial_ring {
                Some(ring) => {
                    let bytes = ring.lock().unwrap_or_else(|e| e.into_inner()).contents();
                    json!({"ok": true, "serial": String::from_utf8_lossy(&bytes)})
                }
                None => {
                    json!({"ok": false, "error": "Serial output is not a ring (serial = \"ring\")"})
                }
            },
            Command::Shutdown => {
                if self
                    .p
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .ctrl_alt_del()
                {
                    json!({"ok": true})
                } else {
                    json!({"ok": false, "error": "The keyboard buffer is full; try again"})
                }
            }
            Command::Kill => {
                self.p.exit.signal(ExitReason::Killed);
                json!({"ok": true})
            }
        }
    }
}
