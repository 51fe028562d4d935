{{/*
Ports are fixed: they are the binaries' defaults, and the Services, probes, and the containerd
mirror all rely on them.
*/}}
{{- define "damselfly.ports" -}}
schedulerGrpc: 8002
schedulerMetrics: 8000
dfdaemonGrpc: 4000
dfdaemonProxy: 4001
dfdaemonMetrics: 4002
dfdaemonHealth: 4003
dfdaemonUpload: 4005
{{- end }}

{{- define "damselfly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name: the release name unless fullnameOverride is set. Kept short
(45 characters) so "<prefix>-seed-peer-headless" fits in a 63-character DNS label.
*/}}
{{- define "damselfly.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- end }}

{{- define "damselfly.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "damselfly.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/* Common labels; call with (dict "ctx" $ "component" "scheduler"). */}}
{{- define "damselfly.labels" -}}
helm.sh/chart: {{ include "damselfly.chart" .ctx }}
{{ include "damselfly.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: damselfly
{{- end }}

{{- define "damselfly.selectorLabels" -}}
app.kubernetes.io/name: {{ include "damselfly.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "damselfly.scheduler.fullname" -}}{{ include "damselfly.fullname" . }}-scheduler{{- end }}
{{- define "damselfly.scheduler.headless" -}}{{ include "damselfly.fullname" . }}-scheduler-headless{{- end }}
{{- define "damselfly.seedPeer.fullname" -}}{{ include "damselfly.fullname" . }}-seed-peer{{- end }}
{{- define "damselfly.seedPeer.headless" -}}{{ include "damselfly.fullname" . }}-seed-peer-headless{{- end }}
{{- define "damselfly.dfdaemon.fullname" -}}{{ include "damselfly.fullname" . }}-dfdaemon{{- end }}

{{/* The scheduler pod addresses HOST:PORT, one per replica, as a YAML list. */}}
{{- define "damselfly.scheduler.addresses" -}}
{{- $ports := include "damselfly.ports" . | fromYaml }}
{{- $addresses := list }}
{{- if .Values.scheduler.enabled }}
{{- range $i := until (int .Values.scheduler.replicas) }}
{{- $addresses = append $addresses (printf "%s-%d.%s.%s.svc.%s:%v" (include "damselfly.scheduler.fullname" $) $i (include "damselfly.scheduler.headless" $) $.Release.Namespace $.Values.clusterDomain $ports.schedulerGrpc) }}
{{- end }}
{{- end }}
{{- toYaml $addresses }}
{{- end }}

{{/* The seed peer pod addresses HOST:PORT (dfdaemon gRPC), one per replica, as a YAML list. */}}
{{- define "damselfly.seedPeer.addresses" -}}
{{- $ports := include "damselfly.ports" . | fromYaml }}
{{- $addresses := list }}
{{- if .Values.seedPeer.enabled }}
{{- range $i := until (int .Values.seedPeer.replicas) }}
{{- $addresses = append $addresses (printf "%s-%d.%s.%s.svc.%s:%v" (include "damselfly.seedPeer.fullname" $) $i (include "damselfly.seedPeer.headless" $) $.Release.Namespace $.Values.clusterDomain $ports.dfdaemonGrpc) }}
{{- end }}
{{- end }}
{{- toYaml $addresses }}
{{- end }}

{{/*
Overlay a user config mapping on chart defaults, key by key (the configs are flat), so that any
user value wins, including false, 0 and "". Call with (dict "defaults" $d "user" $u).
*/}}
{{- define "damselfly.mergeConfig" -}}
{{- $config := deepCopy .defaults }}
{{- range $key, $value := (.user | default dict) }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* scheduler.yaml */}}
{{- define "damselfly.scheduler.config" -}}
{{- $ports := include "damselfly.ports" . | fromYaml }}
{{- $defaults := dict
  "log_level" .Values.log.level
  "log_format" .Values.log.format
  "listen" (printf "0.0.0.0:%v" $ports.schedulerGrpc)
  "metrics_listen" (printf "0.0.0.0:%v" $ports.schedulerMetrics)
  "seed_peer" (include "damselfly.seedPeer.addresses" . | fromYamlArray)
}}
{{- include "damselfly.mergeConfig" (dict "defaults" $defaults "user" .Values.scheduler.config) }}
{{- end }}

{{/* Keys shared by dfdaemon.yaml and dfdaemon-seed.yaml. */}}
{{- define "damselfly.dfdaemon.baseConfig" -}}
{{- $ports := include "damselfly.ports" . | fromYaml }}
log_level: {{ .Values.log.level }}
log_format: {{ .Values.log.format }}
scheduler:
{{- include "damselfly.scheduler.addresses" . | nindent 2 }}
data_dir: /var/lib/damselfly
socket: /var/run/damselfly/dfdaemon.sock
grpc_listen: 0.0.0.0:{{ $ports.dfdaemonGrpc }}
proxy_listen: 0.0.0.0:{{ $ports.dfdaemonProxy }}
metrics_listen: 0.0.0.0:{{ $ports.dfdaemonMetrics }}
health_listen: 0.0.0.0:{{ $ports.dfdaemonHealth }}
upload_listen: 0.0.0.0:{{ $ports.dfdaemonUpload }}
{{- end }}

{{/* dfdaemon.yaml */}}
{{- define "damselfly.dfdaemon.config" -}}
{{- $defaults := include "damselfly.dfdaemon.baseConfig" . | fromYaml }}
{{- include "damselfly.mergeConfig" (dict "defaults" $defaults "user" .Values.dfdaemon.config) }}
{{- end }}

{{/* dfdaemon-seed.yaml */}}
{{- define "damselfly.seedPeer.config" -}}
{{- $defaults := include "damselfly.dfdaemon.baseConfig" . | fromYaml }}
{{- $_ := set $defaults "seed" true }}
{{- include "damselfly.mergeConfig" (dict "defaults" $defaults "user" .Values.seedPeer.config) }}
{{- end }}

{{/* hosts.toml of one registry; call with (dict "ctx" $ "registry" $registry). */}}
{{- define "damselfly.containerd.hostsToml" -}}
{{- $ports := include "damselfly.ports" .ctx | fromYaml -}}
# Written by the Damselfly chart ({{ .ctx.Release.Name }}): pull {{ .registry.host }} through the
# local dfdaemon, and go straight to the registry when the dfdaemon is unavailable.
server = {{ .registry.server | quote }}

[host."http://127.0.0.1:{{ $ports.dfdaemonProxy }}"]
  capabilities = ["pull", "resolve"]
{{- end }}

{{/* Env vars telling a dfdaemon who it is (used in its args). */}}
{{- define "damselfly.dfdaemon.identityEnv" -}}
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: {{ .hostIPField }}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

{{/* Liveness / readiness / startup probes of a component; call with (dict "port" N). */}}
{{- define "damselfly.probes" -}}
startupProbe:
  httpGet:
    path: /healthy
    port: {{ .port }}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet:
    path: /healthy
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /ready
    port: {{ .port }}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}
