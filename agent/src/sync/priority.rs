//! Being a good neighbour on a production host: CPU and I/O priority of the
//! threads that read, hash and compress.
//!
//! Both apply per thread (Linux schedules threads), so the scan threads
//! yield to the host's workload while the control channel stays responsive.
//! `nice` uses `setpriority(PRIO_PROCESS, tid)`; the I/O class uses
//! `ioprio_set(IOPRIO_WHO_PROCESS, tid)`, which the CFQ/BFQ schedulers
//! honour (`idle`: only when the disk is otherwise idle).

/// I/O scheduling class for the scan threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoClass {
    /// Leave the kernel's default.
    Default,
    /// Best effort, with a level from 0 (highest) to 7 (lowest).
    BestEffort(u8),
    /// Only when no one else uses the disk.
    Idle,
}

/// Priorities for a scan thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanPriority {
    /// Nice value, -20..=19 (None: inherit).
    pub nice: Option<i32>,
    /// I/O class.
    pub io: IoClass,
}

impl Default for ScanPriority {
    fn default() -> Self {
        ScanPriority {
            nice: None,
            io: IoClass::Default,
        }
    }
}

const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
const IOPRIO_CLASS_BE: libc::c_int = 2;
const IOPRIO_CLASS_IDLE: libc::c_int = 3;

fn current_tid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

impl ScanPriority {
    /// Applies the priorities to the calling thread; failures are returned
    /// (the caller logs them and carries on: priority is a courtesy, not a
    /// correctness matter).
    pub fn apply_to_current_thread(&self) -> std::io::Result<()> {
        let tid = current_tid();
        if let Some(nice) = self.nice {
            // SAFETY: setpriority on our own thread id.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let value = match self.io {
            IoClass::Default => return Ok(()),
            IoClass::BestEffort(level) => {
                (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | libc::c_int::from(level.min(7))
            }
            IoClass::Idle => IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        };
        // SAFETY: ioprio_set on our own thread id with a valid value.
        if unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, value) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_apply_to_the_calling_thread_only() {
        let p = ScanPriority {
            nice: Some(10),
            io: IoClass::Idle,
        };
        let (nice, ioprio) = std::thread::spawn(move || {
            p.apply_to_current_thread().unwrap();
            let tid = current_tid();
            // SAFETY: getpriority/ioprio_get on our own thread id.
            unsafe {
                (
                    libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t),
                    libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) as libc::c_int,
                )
            }
        })
        .join()
        .unwrap();
        assert_eq!(nice, 10);
        assert_eq!(ioprio >> IOPRIO_CLASS_SHIFT, IOPRIO_CLASS_IDLE);
        // This thread is untouched.
        // SAFETY: getpriority on our own thread id.
        let mine = unsafe { libc::getpriority(libc::PRIO_PROCESS, current_tid() as libc::id_t) };
        assert_ne!(mine, 10);
    }
}
