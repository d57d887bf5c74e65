// The connector_echo test app on the ES module connector; its behaviour is in connector_echo_handler.cjs.
import ApmModule from '../../connectors/apm_module.node.mjs';
import handle from './connector_echo_handler.cjs';

handle.ipc(new ApmModule((session) => handle(session, 'node-esm')));
