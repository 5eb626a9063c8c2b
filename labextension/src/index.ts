/**
 * jupyterhub-hpc-timeleft: the batch job's time left in JupyterLab's status bar.
 *
 * Reads `GET <base_url>api/hpc/timeleft` (lab_timeleft/) every POLL_MS:
 *  - `end` null (no batch job or no time limit): nothing is shown;
 *  - otherwise a status-bar item "time left H:MM" counts down every second (its title has the
 *    end time and the seconds left; `data-seconds-left` carries them for tests and styling);
 *  - the first time `warning` is set (the batch system's walltime warning reached the node
 *    agent) a notification appears and every open document is saved (`docmanager:save-all`).
 */
import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

const POLL_MS = 3000;
const SAVE_ALL = 'docmanager:save-all';

interface ITimeLeft {
  end: number | null;
  now: number;
  warning: { message: string; at: number } | null;
}

/** "H:MM" for a number of seconds (never negative). */
export function formatLeft(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return `${h}:${m < 10 ? '0' : ''}${m}`;
}

class TimeLeftItem extends Widget {
  private end: number | null = null;
  private skew = 0; // server clock minus browser clock, seconds

  constructor() {
    super();
    this.addClass('jp-hpc-TimeLeft');
    this.node.textContent = '';
  }

  get active(): boolean {
    return this.end !== null;
  }

  update_(data: ITimeLeft): void {
    this.end = data.end;
    this.skew = data.now - Date.now() / 1000;
    this.tick();
  }

  endText(): string {
    return this.end === null ? '' : new Date(this.end * 1000).toLocaleTimeString();
  }

  setWarning(on: boolean): void {
    this.toggleClass('jp-hpc-TimeLeft-warning', on);
  }

  tick(): void {
    if (this.end === null) {
      this.node.textContent = '';
      delete this.node.dataset.secondsLeft;
      return;
    }
    const left = Math.max(0, Math.round(this.end - (Date.now() / 1000 + this.skew)));
    this.node.textContent = `time left ${formatLeft(left)}`;
    this.node.dataset.secondsLeft = String(left);
    this.node.title = `The batch job ends at ${new Date(this.end * 1000).toLocaleTimeString()} (${left} s left); unsaved work is lost then.`;
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyterhub-hpc-timeleft:plugin',
  description: "The batch job's time left in the status bar; save all at the walltime warning.",
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const settings = ServerConnection.makeSettings();
    const url = URLExt.join(settings.baseUrl, 'api/hpc/timeleft');
    const item = new TimeLeftItem();
    let warned = false;
    let stopped = false;
    if (statusBar) {
      statusBar.registerStatusItem('jupyterhub-hpc-timeleft:item', {
        item,
        align: 'left',
        rank: 100,
        isActive: () => item.active
      });
    }

    const onWarning = async (message: string): Promise<void> => {
      warned = true;
      item.setWarning(true);
      const end = item.endText();
      Notification.warning(
        `This server's batch job is close to its time limit${end ? ` (ends ${end})` : ''}: ` +
          'open documents are being saved.',
        { autoClose: false }
      );
      console.info(`jupyterhub-hpc-timeleft: walltime warning: ${message}`);
      try {
        await app.commands.execute(SAVE_ALL);
        console.info('jupyterhub-hpc-timeleft: saved all open documents');
      } catch (err) {
        console.error('jupyterhub-hpc-timeleft: save all failed', err);
      }
    };

    const poll = async (): Promise<void> => {
      let data: ITimeLeft;
      try {
        const response = await ServerConnection.makeRequest(url, {}, settings);
        if (response.status === 404) {
          stopped = true; // the server side of the extension is not enabled: show nothing
          return;
        }
        if (!response.ok) {
          return;
        }
        data = (await response.json()) as ITimeLeft;
      } catch (err) {
        return; // server unreachable for a moment: keep counting from what we know
      }
      item.update_(data);
      if (data.warning && !warned) {
        await onWarning(data.warning.message);
      }
    };

    const loop = async (): Promise<void> => {
      await app.restored;
      while (!stopped) {
        await poll();
        await new Promise(resolve => setTimeout(resolve, POLL_MS));
      }
    };
    void loop();
    setInterval(() => item.tick(), 1000);
  }
};

export default plugin;
